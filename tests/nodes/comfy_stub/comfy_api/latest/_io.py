"""The subset of comfy_api.latest.io the node pack uses, with ComfyUI 0.8's signatures and behaviour.

Copied down from comfy_api/latest/_io.py: input/output declarations and their `as_dict`, the Schema with
its V1 rendering (what /object_info serves), Autogrow templates, ComfyNode and NodeOutput.
"""

from __future__ import annotations

import copy
from collections import Counter
from enum import Enum
from typing import Any


def prune_dict(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class _ComfyType:
    Type = Any
    io_type: str = None


def comfytype(io_type: str):
    def decorator(cls):
        cls.io_type = io_type
        for name in ("Input", "Output"):
            inner = cls.__dict__.get(name) or getattr(cls, name, None)
            if inner is not None:
                inner = type(inner.__name__, (inner,), {})
                inner.Parent = cls
                setattr(cls, name, inner)
        return cls
    return decorator


class _IO_V3:
    Parent = None

    def validate(self):
        pass

    @property
    def io_type(self):
        return self.Parent.io_type


class Input(_IO_V3):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 extra_dict=None, raw_link: bool = None):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict if extra_dict is not None else {}
        self.rawLink = raw_link

    def as_dict(self):
        return prune_dict({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                           "lazy": self.lazy, "rawLink": self.rawLink}) | prune_dict(self.extra_dict)

    def get_io_type(self):
        return self.io_type

    def get_all(self):
        return [self]


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 default: Any = None, socketless: bool = None, widget_type: str = None, force_input: bool = None,
                 extra_dict=None, raw_link: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input

    def as_dict(self):
        return super().as_dict() | prune_dict({"default": self.default, "socketless": self.socketless,
                                               "widgetType": self.widget_type, "forceInput": self.force_input})


class Output(_IO_V3):
    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id = id
        self.display_name = display_name if display_name else id
        self.tooltip = tooltip
        self.is_output_list = is_output_list


class ComfyTypeI(_ComfyType):
    class Input(Input):
        ...


class ComfyTypeIO(ComfyTypeI):
    class Output(Output):
        ...


def Custom(io_type: str):
    @comfytype(io_type=io_type)
    class CustomComfyType(ComfyTypeIO):
        ...
    return CustomComfyType


@comfytype(io_type="BOOLEAN")
class Boolean(ComfyTypeIO):
    Type = bool

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, default: bool = None, label_on: str = None, label_off: str = None,
                     socketless: bool = None, force_input: bool = None, extra_dict=None, raw_link: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.label_on = label_on
            self.label_off = label_off

        def as_dict(self):
            return super().as_dict() | prune_dict({"label_on": self.label_on, "label_off": self.label_off})


@comfytype(io_type="INT")
class Int(ComfyTypeIO):
    Type = int

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, default: int = None, min: int = None, max: int = None, step: int = None,
                     control_after_generate: bool = None, display_mode: NumberDisplay = None,
                     socketless: bool = None, force_input: bool = None, extra_dict=None, raw_link: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.min = min
            self.max = max
            self.step = step
            self.control_after_generate = control_after_generate
            self.display_mode = display_mode

        def as_dict(self):
            return super().as_dict() | prune_dict({
                "min": self.min, "max": self.max, "step": self.step,
                "control_after_generate": self.control_after_generate,
                "display": self.display_mode.value if self.display_mode else None})


@comfytype(io_type="FLOAT")
class Float(ComfyTypeIO):
    Type = float

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, default: float = None, min: float = None, max: float = None,
                     step: float = None, round: float = None, display_mode: NumberDisplay = None,
                     socketless: bool = None, force_input: bool = None, extra_dict=None, raw_link: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.min = min
            self.max = max
            self.step = step
            self.round = round
            self.display_mode = display_mode

        def as_dict(self):
            return super().as_dict() | prune_dict({"min": self.min, "max": self.max, "step": self.step,
                                                   "round": self.round, "display": self.display_mode})


@comfytype(io_type="STRING")
class String(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, multiline=False, placeholder: str = None, default: str = None,
                     dynamic_prompts: bool = None, socketless: bool = None, force_input: bool = None,
                     extra_dict=None, raw_link: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.multiline = multiline
            self.placeholder = placeholder
            self.dynamic_prompts = dynamic_prompts

        def as_dict(self):
            return super().as_dict() | prune_dict({"multiline": self.multiline, "placeholder": self.placeholder,
                                                   "dynamicPrompts": self.dynamic_prompts})


@comfytype(io_type="COMBO")
class Combo(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, options=None, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, default=None, control_after_generate: bool = None, upload=None,
                     image_folder=None, remote=None, socketless: bool = None, extra_dict=None,
                     raw_link: bool = None):
            if isinstance(options, type) and issubclass(options, Enum):
                options = [v.value for v in options]
            if isinstance(default, Enum):
                default = default.value
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, None,
                             extra_dict, raw_link)
            self.multiselect = False
            self.options = options
            self.control_after_generate = control_after_generate
            self.upload = upload
            self.image_folder = image_folder
            self.remote = remote

        def as_dict(self):
            return super().as_dict() | prune_dict({"multiselect": self.multiselect, "options": self.options,
                                                   "control_after_generate": self.control_after_generate})


@comfytype(io_type="IMAGE")
class Image(ComfyTypeIO):
    ...


@comfytype(io_type="MASK")
class Mask(ComfyTypeIO):
    ...


@comfytype(io_type="LATENT")
class Latent(ComfyTypeIO):
    ...


@comfytype(io_type="MODEL")
class Model(ComfyTypeIO):
    ...


@comfytype(io_type="CLIP")
class Clip(ComfyTypeIO):
    ...


@comfytype(io_type="VAE")
class Vae(ComfyTypeIO):
    ...


@comfytype(io_type="CONDITIONING")
class Conditioning(ComfyTypeIO):
    ...


@comfytype(io_type="GUIDER")
class Guider(ComfyTypeIO):
    ...


class DynamicInput(Input):
    pass


@comfytype(io_type="COMFY_AUTOGROW_V3")
class Autogrow(ComfyTypeI):
    Type = dict
    _MaxNames = 100

    class _AutogrowTemplate:
        def __init__(self, input: Input):
            assert not isinstance(input, DynamicInput)
            self.input = copy.copy(input)
            if isinstance(self.input, WidgetInput):
                self.input.force_input = True
            self.names: list[str] = []
            self.cached_inputs = {}

        def _create_cached_inputs(self):
            for name in self.names:
                new_input = copy.copy(self.input)
                new_input.id = name
                self.cached_inputs[name] = new_input

        def get_all(self):
            return list(self.cached_inputs.values())

        def as_dict(self):
            return prune_dict({"input": create_input_dict_v1([self.input])})

        def validate(self):
            self.input.validate()

    class TemplatePrefix(_AutogrowTemplate):
        def __init__(self, input: Input, prefix: str, min: int = 1, max: int = 10):
            super().__init__(input)
            assert min >= 0 and 1 <= max <= Autogrow._MaxNames
            self.prefix = prefix
            self.min = min
            self.max = max
            self.names = [f"{self.prefix}{i}" for i in range(self.max)]
            self._create_cached_inputs()

        def as_dict(self):
            return super().as_dict() | prune_dict({"prefix": self.prefix, "min": self.min, "max": self.max})

    class TemplateNames(_AutogrowTemplate):
        def __init__(self, input: Input, names: list[str], min: int = 1):
            super().__init__(input)
            assert min >= 0
            self.names = names[:Autogrow._MaxNames]
            self.min = min
            self._create_cached_inputs()

        def as_dict(self):
            return super().as_dict() | prune_dict({"names": self.names, "min": self.min})

    class Input(DynamicInput):
        def __init__(self, id: str, template, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
            self.template = template

        def as_dict(self):
            return super().as_dict() | prune_dict({"template": self.template.as_dict()})

        def get_all(self):
            return [self] + self.template.get_all()

        def validate(self):
            self.template.validate()


def create_input_dict_v1(inputs: list[Input]) -> dict:
    result = {"required": {}}
    for i in inputs:
        as_dict = i.as_dict()
        as_dict.pop("optional", None)
        result.setdefault("optional" if i.optional else "required", {})[i.id] = (i.get_io_type(), as_dict)
    return result


class Schema:
    def __init__(self, node_id: str, display_name: str = None, category: str = "sd", inputs=None, outputs=None,
                 hidden=None, description: str = "", is_input_list: bool = False, is_output_node: bool = False,
                 is_deprecated: bool = False, is_experimental: bool = False, is_api_node: bool = False,
                 not_idempotent: bool = False, enable_expand: bool = False):
        self.node_id = node_id
        self.display_name = display_name
        self.category = category
        self.inputs = inputs if inputs is not None else []
        self.outputs = outputs if outputs is not None else []
        self.hidden = hidden if hidden is not None else []
        self.description = description
        self.is_input_list = is_input_list
        self.is_output_node = is_output_node
        self.is_deprecated = is_deprecated
        self.is_experimental = is_experimental
        self.is_api_node = is_api_node
        self.not_idempotent = not_idempotent
        self.enable_expand = enable_expand

    def validate(self):
        nested = [i for input in self.inputs if not isinstance(input, DynamicInput) for i in input.get_all()]
        input_ids = [i.id for i in nested]
        output_ids = [o.id for o in self.outputs]
        issues = []
        if len(set(input_ids)) != len(input_ids):
            issues.append(f"Input ids must be unique, but {[k for k, n in Counter(input_ids).items() if n > 1]} are not.")
        if len(set(output_ids)) != len(output_ids):
            issues.append(f"Output ids must be unique, but {[k for k, n in Counter(output_ids).items() if n > 1]} are not.")
        if issues:
            raise ValueError("\n".join(issues))
        for input in self.inputs:
            input.validate()

    def finalize(self):
        if self.is_output_node:
            for hidden in (Hidden.prompt, Hidden.extra_pnginfo):
                if hidden not in self.hidden:
                    self.hidden.append(hidden)
        for i, output in enumerate(self.outputs):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"

    def get_v1_info(self, cls=None) -> dict:
        """The node's entry in /object_info (the V1 rendering), as far as the pack's nodes need."""
        inputs = create_input_dict_v1(self.inputs)
        for hidden in self.hidden:
            inputs.setdefault("hidden", {})[hidden.name] = (hidden.value,)
        return {
            "input": inputs,
            "input_order": {key: list(value.keys()) for key, value in inputs.items()},
            "output": [o.io_type for o in self.outputs],
            "output_is_list": [o.is_output_list for o in self.outputs],
            "output_name": [o.display_name if o.display_name else o.io_type for o in self.outputs],
            "name": self.node_id,
            "display_name": self.display_name,
            "description": self.description,
            "category": self.category,
            "output_node": self.is_output_node,
        }


class HiddenHolder:
    def __init__(self, **values):
        self.__dict__.update(values)

    def __getattr__(self, key):
        return None


class ComfyNode:
    hidden = HiddenHolder()

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        return schema


class NodeOutput:
    def __init__(self, *args: Any, ui=None, expand: dict = None, block_execution: str = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index):
        return self.args[index]
