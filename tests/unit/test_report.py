"""The evaluation report: the same sections in Markdown and HTML, the plot, and the examples at both ends."""

import html

from canaryflow.evaluation import report

INPUTS = [f"input {i}" for i in range(6)]
REFS = [[f"the answer is {i}"] for i in range(6)]
PREDICTIONS = {
    "challenger": [f"the answer is {i}" for i in range(5)] + ["nothing"],
    "champion": ["the answer is 0", "wrong", "wrong", "the answer is 3", "the answer is 4", "the answer is 5"],
}
RESULT = {
    "metrics": {"challenger": {"bleu": 80.0, "chrf": 85.0}, "champion": {"bleu": 60.0, "chrf": 70.0}},
    "comparisons": {
        "bleu": {"diff": 20.0, "ci_low": 5.0, "ci_high": 30.0, "confidence": 0.95, "threshold": -1.0, "p_value": 0.002}
    },
    "latency_ms": {"challenger": {"p50": 12.0, "p95": 30.0}},
    "champion_version": "4",
    "test_inputs": 6,
    "gate": {
        "passed": True,
        "reasons": ["ok bleu vs champion: because"],
        "warnings": ["gate: bleu's margin 1.00 is below what 6 test inputs can resolve"],
    },
}


def _both_say(md: str, page: str, *texts: str) -> None:
    for text in texts:
        assert html.escape(text) in page, text
        assert text in md, text


def test_best_and_worst_examples_come_from_per_example_differences():
    built = report.build(RESULT, INPUTS, REFS, PREDICTIONS)
    assert len(built.per_example) == 6
    assert {e.input for e in built.best[:2]} == {"input 1", "input 2"}  # the champion got these wrong
    assert built.worst[0].input == "input 5" and built.worst[0].diff < 0  # the challenger lost this one
    assert built.worst[0].champion == "the answer is 5"


def test_markdown_and_html_say_the_same_things():
    built = report.build(RESULT, INPUTS, REFS, PREDICTIONS)
    md = report.markdown(built, "plot.png")
    page = report.to_html(built)
    _both_say(
        md,
        page,
        "Gate: PASSED on 6 test inputs, against champion version 4.",
        "[+5.00, +30.00] (95%)",
        "0.0020 (H0: diff <= -1.00)",
        "ok bleu vs champion: because",
        "warning: gate: bleu's margin 1.00 is below what 6 test inputs can resolve",
        "p50 12 ms, p95 30 ms",
    )
    assert "![per-example differences](plot.png)" in md
    assert page.count("data:image/png;base64,") == 1
    assert md.count("| input 5 |") == 1 and "| input 5 | nothing | the answer is 5 |" in md


TRAINED = {
    "stopped": "plateau: validation loss did not improve for 3 evaluations",
    "steps": 300,
    "max_steps": 900,
    "train_seconds": 41.6,
    "first_loss": 7.25,
    "final_loss": 1.5,
    "learning_curve": {
        "train": [[10, 7.25], [150, 2.0], [300, 1.5]],
        "validation": [[100, 2.4], [200, 1.9], [300, 2.0]],
    },
}


def test_the_report_says_why_training_stopped_and_shows_its_learning_curve(tmp_path):
    built = report.build(RESULT, INPUTS, REFS, PREDICTIONS)
    built.training = TRAINED
    assert report.write_learning_curve(built, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report.markdown(built, "plot.png", "curve.png")
    page = report.to_html(built)
    _both_say(
        md,
        page,
        "Stopped: plateau: validation loss did not improve for 3 evaluations, after 300 steps (at most 900) in 42 s.",
        "Training loss 7.250 at the first logged step, 1.500 at the last.",
        "Validation loss 2.000 at step 300; lowest 1.900 at step 200, of 3 evaluations.",
    )
    assert "![learning curve](curve.png)" in md
    assert page.count("data:image/png;base64,") == 2  # the per-example plot and the learning curve
    # A model folder without its training metrics (a model trained elsewhere): no section, no curve.
    bare = report.build(RESULT, INPUTS, REFS, PREDICTIONS)
    assert "## Training" not in report.markdown(bare) and not report.write_learning_curve(bare, tmp_path / "x.png")


def test_the_plot_counts_wins_and_losses():
    ax = report.plot(report.build(RESULT, INPUTS, REFS, PREDICTIONS))
    assert len(ax.patches) == 6
    assert ax.get_title() == "per-example differences: 2 better, 1 worse, 3 tied"


def test_without_a_champion_the_report_shows_the_challenger_alone():
    alone = dict(RESULT, metrics={"challenger": {"bleu": 80.0}, "champion": None}, comparisons=None)
    built = report.build(alone, INPUTS, REFS, {"challenger": PREDICTIONS["challenger"]})
    md = report.markdown(built)
    assert "with no champion yet" in md and "| bleu | 80.00 | - | - | - | - |" in md
    assert report.plot(built).get_title() == "per-example scores (no champion to compare with)"


def test_the_model_card_and_the_run_summary_carry_the_gate_s_warnings():
    import io

    from rich.console import Console

    from canaryflow.cli import render_summary
    from canaryflow.config import Config
    from canaryflow.registry.models import model_card

    warning = RESULT["gate"]["warnings"][0]
    card = model_card(Config(), {}, RESULT)
    assert f"- ok bleu vs champion: because\n- warning: {warning}\n" in card
    out = io.StringIO()
    render_summary({"gate": RESULT["gate"]}, Console(file=out, width=200))
    assert f"  ok bleu vs champion: because\nwarning: {warning}\n" in out.getvalue()
    # A run whose evaluation holds no warnings prints none.
    out = io.StringIO()
    render_summary({"gate": {"passed": True, "reasons": []}}, Console(file=out, width=200))
    assert "warning" not in out.getvalue()


def test_tables_piped_into_a_log_keep_their_cells_whole(monkeypatch, capsys):
    """Under CI or `| less` there is no terminal: a registry table is not cut at Rich's 80 columns."""
    from canaryflow import cli

    monkeypatch.delenv("COLUMNS", raising=False)
    stamp, reason = "2026-12-02 00:58:13", "rolled back: step at 50%: error rate 3.2x the champion's " * 2
    cli._print_rows([{"version": 7, "registered": stamp, "alias": "challenger", "why": reason}], "history", False)
    shown = capsys.readouterr().err
    assert stamp in shown and reason.strip() in shown and "…" not in shown
    monkeypatch.setenv("COLUMNS", "100")  # a width asked for is kept
    assert cli._console().width == 100


def test_the_run_summary_says_why_training_stopped():
    import io

    from rich.console import Console

    from canaryflow.cli import STOPPED, render_summary

    train = {"first_loss": 5.1, "final_loss": 1.2, "val_loss": 1.4, "steps": 620, "train_seconds": 88.0}
    for reason, text in STOPPED.items():
        out = io.StringIO()
        render_summary({"train": {**train, "stopped": reason}}, Console(file=out, width=300))
        assert f"620 steps in 88.0 s; stopped: {text}" in out.getvalue() and "(validation 1.40" in out.getvalue()
