"""The models-from-code file of the routed pyfunc model (:mod:`taps_cl.serving.pyfunc`).

MLflow runs this file to load the model, so a logged routed model holds code and JSON, never a
pickled object.
"""

import mlflow

from taps_cl.serving.pyfunc import RoutedModel

mlflow.models.set_model(RoutedModel())
