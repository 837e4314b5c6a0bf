"""The front end: MODEL specs to models with example inputs, weights, and the zoo of small models.

    from dittofx.models import resolve, load_weights, example_inputs_for, zoo

This folder stands alone: it imports nothing of dittofx but its errors.
"""

from dittofx.models.example_inputs import example_inputs_for, parse_input_shape
from dittofx.models.specs import SPEC_FORMS, ResolvedModel, resolve
from dittofx.models.weights import load_weights

__all__ = ["resolve", "ResolvedModel", "SPEC_FORMS", "load_weights", "example_inputs_for", "parse_input_shape"]
