"""The pass framework: the :class:`Pass` contract, typed options, the registry, the manager, recipes.

This is the public API for writing passes (see ``docs/writing-a-pass.md``)::

    from onnxcomp import ir
    from onnxcomp.framework import Pass, PassContext, PassResult, register_pass
"""

from __future__ import annotations

from onnxcomp.framework.base import Pass, PassContext, PassResult, Progress
from onnxcomp.framework.manager import PassManager, RunReport, StepReport
from onnxcomp.framework.options import (
    NoOptions,
    build_options,
    option_fields,
    options_to_dict,
)
from onnxcomp.framework.recipe import Recipe, dump_recipe, load_recipe, recipe_from_data
from onnxcomp.framework.registry import (
    ENTRY_POINT_GROUP,
    available_passes,
    describe_passes,
    get_pass,
    make_pass,
    pass_source,
    register_pass,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "NoOptions",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "Progress",
    "Recipe",
    "RunReport",
    "StepReport",
    "available_passes",
    "build_options",
    "describe_passes",
    "dump_recipe",
    "get_pass",
    "load_recipe",
    "make_pass",
    "option_fields",
    "options_to_dict",
    "pass_source",
    "recipe_from_data",
    "register_pass",
]
