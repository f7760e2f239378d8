"""ddpm_hf's DDPMScheduler, UNet2DModel and DDPMPipeline have every attribute of diffusers', with compatible signatures.

The attributes are enumerated from the installed diffusers, so a diffusers release that adds one fails this test until
ddpm_hf has it too (or lists it in OMITTED with the reason). Methods inherited from diffusers' mixins are diffusers'
own code and pass as they are; what they do on ddpm_hf's classes is tested elsewhere (tests/test_conventions.py).
"""

import dataclasses
import inspect

import diffusers
import pytest
import torch

import ddpm_hf
from ddpm_hf.models import UNet2DOutput
from ddpm_hf.schedulers import DDPMSchedulerOutput

from conftest import TINY_UNET_CONFIG

CLASSES = ("DDPMScheduler", "UNet2DModel", "DDPMPipeline")

# (class, attribute) -> why ddpm_hf does not have it. Empty today: keep every entry's reason current.
OMITTED: dict[tuple[str, str], str] = {}

# (class, attribute, parameter) -> why its default differs (each also a row of README's "Differences from diffusers").
OTHER_DEFAULTS: dict[tuple[str, str, str], str] = {
    ("DDPMPipeline", "__call__", "num_inference_steps"):
        "None is diffusers' 1000, or the measured steps of the sampler use_fast_sampler() set",
}

# Dunder methods that belong to Python or torch, not to the diffusers API.
GENERIC_DUNDERS = {
    "__class__", "__delattr__", "__dir__", "__eq__", "__format__", "__ge__", "__getattribute__", "__gt__", "__hash__",
    "__init_subclass__", "__le__", "__lt__", "__ne__", "__new__", "__reduce__", "__reduce_ex__", "__sizeof__",
    "__str__", "__subclasshook__", "__getstate__", "__setstate__", "__delitem__", "__dict__", "__doc__", "__module__",
    "__weakref__", "__annotations__", "__firstlineno__", "__static_attributes__", "__parameters__", "__orig_bases__",
    "__abstractmethods__",
}


def api_names(cls: type) -> list[str]:
    """Public and semi-public names of `cls`, and the dunder methods diffusers' classes define themselves."""
    names = {name for name in dir(cls) if not name.startswith("__")}
    names |= {name for klass in cls.__mro__ if klass.__module__.startswith("diffusers")
              for name in vars(klass) if name.startswith("__") and name not in GENERIC_DUNDERS}
    return sorted(names)


def cases() -> list[tuple[str, str]]:
    return [(name, attribute) for name in CLASSES for attribute in api_names(getattr(diffusers, name))]


def signature_problems(theirs: inspect.Signature, ours: inspect.Signature, other_defaults: set[str] = frozenset()
                       ) -> list[str]:
    """How a call written for `theirs` could fail or change meaning with `ours`: a parameter missing, moved, with
    another default, keyword-only where theirs takes it by position; or a new parameter without a default."""
    kinds = inspect.Parameter
    positional = (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    their_params, our_params = theirs.parameters, ours.parameters
    takes_any_keyword = any(p.kind is kinds.VAR_KEYWORD for p in our_params.values())
    problems = []
    their_positional = [n for n, p in their_params.items() if p.kind in positional]
    our_positional = [n for n, p in our_params.items() if p.kind in positional]
    if our_positional[: len(their_positional)] != their_positional:
        problems.append(f"positional parameters {their_positional} vs {our_positional}")
    for name, param in their_params.items():
        if param.kind in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD):
            if not any(p.kind is param.kind for p in our_params.values()):
                problems.append(f"no {param}")
        elif name not in our_params:
            if not takes_any_keyword:
                problems.append(f"no parameter {name!r}")
        elif our_params[name].default != param.default and name not in other_defaults:
            problems.append(f"{name}={our_params[name].default!r} instead of {param.default!r}")
    problems += [f"required parameter {name!r} that diffusers does not have" for name, p in our_params.items()
                 if name not in their_params and p.default is p.empty and p.kind not in
                 (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
    return problems


def kind(attribute: object) -> str:
    for kind_name, types in [("property", property), ("classmethod", classmethod), ("staticmethod", staticmethod)]:
        if isinstance(attribute, types):
            return kind_name
    return "method" if inspect.isfunction(attribute) else "value"


@pytest.mark.parametrize(("class_name", "attribute"), cases())
def test_attribute_exists_with_a_compatible_signature(class_name, attribute):
    if (class_name, attribute) in OMITTED:
        pytest.skip(OMITTED[class_name, attribute])
    theirs, ours = getattr(diffusers, class_name), getattr(ddpm_hf, class_name)
    their_attribute = inspect.getattr_static(theirs, attribute)
    our_attribute = inspect.getattr_static(ours, attribute, None)
    assert our_attribute is not None or hasattr(ours, attribute), f"ddpm_hf.{class_name} has no {attribute}"
    if our_attribute is their_attribute:  # inherited from the same diffusers mixin
        return
    assert kind(our_attribute) == kind(their_attribute), f"{attribute} is a {kind(our_attribute)} here"
    if kind(their_attribute) == "value":
        assert our_attribute == their_attribute
    elif kind(their_attribute) != "property":
        other_defaults = {name for (cls, attr, name) in OTHER_DEFAULTS if (cls, attr) == (class_name, attribute)}
        problems = signature_problems(inspect.signature(getattr(theirs, attribute)),
                                      inspect.signature(getattr(ours, attribute)), other_defaults)
        assert not problems, f"{class_name}.{attribute}: {'; '.join(problems)}"


def test_the_default_number_of_steps_is_diffusers_1000():
    """OTHER_DEFAULTS: without use_fast_sampler(), num_inference_steps=None runs diffusers' default of 1000 steps."""
    pipe = ddpm_hf.DDPMPipeline(unet=ddpm_hf.UNet2DModel(**TINY_UNET_CONFIG), scheduler=ddpm_hf.DDPMScheduler())
    steps = []
    pipe(output_type="pt", callback_on_step_end=lambda pipe, index, timestep, tensors: steps.append(int(timestep)))
    assert steps == list(range(999, -1, -1))


def instances(library) -> dict[str, object]:
    scheduler = library.DDPMScheduler()
    unet = library.UNet2DModel(**TINY_UNET_CONFIG)
    return {"DDPMScheduler": scheduler, "UNet2DModel": unet,
            "DDPMPipeline": library.DDPMPipeline(unet=unet, scheduler=scheduler)}


@pytest.mark.parametrize("class_name", CLASSES)
def test_instance_attributes(class_name):
    """What diffusers' constructors set (`one`, `custom_timesteps`, `sample_size`, the submodules, ...) exists here,
    with the same value for the same config."""
    theirs, ours = instances(diffusers)[class_name], instances(ddpm_hf)[class_name]
    names = set(vars(theirs)) | set(getattr(theirs, "_modules", {}))
    missing = sorted(name for name in names if not hasattr(ours, name))
    assert not missing, f"ddpm_hf.{class_name} instances have no {missing}"
    for name in sorted(names):
        value, our_value = getattr(theirs, name), getattr(ours, name)
        if torch.is_tensor(value):
            assert torch.equal(our_value, value) and our_value.dtype == value.dtype, name
        elif isinstance(value, (bool, int, float, str, type(None))):
            assert our_value == value, name
        else:
            assert type(our_value).__name__ == type(value).__name__, name


@pytest.mark.parametrize(("ours", "theirs"), [
    (DDPMSchedulerOutput, diffusers.schedulers.scheduling_ddpm.DDPMSchedulerOutput),
    (UNet2DOutput, diffusers.models.unets.unet_2d.UNet2DOutput),
])
def test_outputs_have_diffusers_fields(ours, theirs):
    def fields(cls):
        return [(field.name, field.default) for field in dataclasses.fields(cls)]

    assert fields(ours) == fields(theirs)
