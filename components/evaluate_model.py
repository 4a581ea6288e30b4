"""KFP component: evaluate_model."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from canaryflow.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate_model(
    config_json: str,
    run_key: str,
    job_id: str,
    data: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[Markdown],
    report_html: Output[HTML],
) -> bool:
    """Score the challenger and the current champion on the same test set; return whether the gate passed.

    Args:
        config_json: The whole canaryflow config as JSON (canaryflow.config.Config).
        run_key: Key of this pipeline run in MLflow; empty means the KFP job id.
        job_id: The KFP job id, used when run_key is empty.
        data: Output of prepare_data.
        model: The challenger, output of fine_tune.
        evaluation: Directory with evaluation.json (metrics of both models, gate reasons) and report.md.
        metrics: The challenger's metrics, shown in the KFP UI.
        report: The Markdown report, shown in the KFP UI: metrics with confidence intervals, gate reasons, examples.
        report_html: The same report as HTML, with the per-example differences plotted inline.
    """
    import shutil

    from canaryflow.steps import evaluate_model_step, run_key_of

    result = evaluate_model_step(config_json, run_key_of(run_key, job_id), data.path, model.path, evaluation.path)
    for name, value in result["metrics"]["challenger"].items():
        metrics.log_metric(name, value)
    shutil.copyfile(f"{evaluation.path}/report.md", report.path)
    shutil.copyfile(f"{evaluation.path}/report.html", report_html.path)
    return result["gate"]["passed"]
