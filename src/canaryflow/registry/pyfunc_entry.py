"""Models-from-code entry point that MLflow copies into every logged model and runs on load."""

from mlflow.models import set_model

from canaryflow.registry.pyfunc_model import Seq2SeqModel

set_model(Seq2SeqModel())
