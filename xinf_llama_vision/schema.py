"""The schema of ``model_specs/*.yaml`` and its conversion into Xinference family objects.

Each YAML file declares one model family. :func:`load_families` validates every file and
names the file and the field in each error, e.g.::

    model_specs/llama-3.2-vision.yaml: specs.0.model_size_in_billions: Input should be a valid integer
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Dict, List, Literal, Optional, Tuple, Union

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError
from .quantization import FORMATS

Ability = Literal["generate", "chat", "vision", "tools"]
Hub = Literal["huggingface", "modelscope"]


def vllm_pins(packages: List[str]) -> List[Tuple[str, List[str]]]:
    """``(package line, pinned versions)`` for each vLLM requirement in virtualenv package lines
    (``vllm==0.10.2 ; #engine# == "vllm"``); Xinference's ``#placeholders#`` are skipped, an invalid
    requirement raises ``ValueError``.

    >>> vllm_pins(['#transformers_dependencies#', 'vllm==0.10.2 ; #engine# == "vllm"', 'torch==2.8.0'])
    [('vllm==0.10.2 ; #engine# == "vllm"', ['0.10.2'])]
    """
    out = []
    for package in packages:
        head = package.split(";", 1)[0].strip()
        if head.startswith("#"):
            continue  # Xinference placeholders such as #transformers_dependencies#
        try:
            requirement = Requirement(head)
        except InvalidRequirement as e:
            raise ValueError(f"{package!r} is not a valid requirement: {e}") from None
        if canonicalize_name(requirement.name) == "vllm":
            out.append((package, [s.version for s in requirement.specifier if s.operator in ("==", "===")]))
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class StopToken(_Strict):
    token: str = Field(pattern=r"^<\|[a-z_]+\|>$")
    id: int = Field(ge=0)


#: The transformers releases the Transformers engine serves Llama 3.2 Vision with: from the oldest one
#: the tests run (the 4.x stage), 4.55 excluded (its intermediate vision layers cannot be brought to
#: Meta's, docs/fidelity.md). ``pyproject.toml`` declares the same (tests/test_schema.py).
TRANSFORMERS_MIN = "4.53.2"
TRANSFORMERS_VERSIONS = SpecifierSet(f">={TRANSFORMERS_MIN},!=4.55.*")
#: The vLLM releases that can run Mllama: it arrived in 0.6.3 (with the V0 engine it needs)
#: and was removed after 0.10.2.
VLLM_MIN, VLLM_MAX = "0.6.3", "0.10.2"
VLLM_MLLAMA_VERSIONS = SpecifierSet(f">={VLLM_MIN},<={VLLM_MAX}")
#: vLLM releases whose V1 engine runs this plugin's own Mllama (xinf_llama_vision.vllm_model): from
#: the first release it was written and tested for, up to the last whose internal APIs it was checked
#: against (the encoder-decoder processor, CrossAttention, the attention metadata change between releases).
VLLM_V1_MIN, VLLM_V1_BELOW = "0.32", "0.34"
VLLM_V1_VERSIONS = SpecifierSet(f">={VLLM_V1_MIN},<{VLLM_V1_BELOW}")


class VLLMDefaults(_Strict):
    """Launch defaults for the vLLM engine at one model size (each overridable at launch).

    Llama 3.2 Vision has 8 key/value heads, so the tensor-parallel size divides 8.
    """

    enforce_eager: bool
    max_num_seqs: int = Field(gt=0)
    max_model_len: int = Field(gt=0)
    gpu_memory_utilization: float = Field(gt=0, le=1)
    tensor_parallel_size: Optional[Literal[1, 2, 4, 8]] = None


class Spec(_Strict):
    """One repository of weights: its format, size, and the quantizations it is offered in
    (:data:`.quantization.FORMATS` says which each format allows)."""

    model_format: Literal["pytorch", "bnb", "fp8"]
    model_size_in_billions: int = Field(gt=0)
    quantizations: List[str] = ["none"]
    hubs: Dict[Hub, str]
    vllm: Optional[VLLMDefaults] = None

    @model_validator(mode="after")
    def _quantizations_of_the_format(self):
        allowed = FORMATS[self.model_format]
        if not self.quantizations or any(q not in allowed for q in self.quantizations):
            raise ValueError(f"{self.model_format} weights come in quantizations {list(allowed)}, not {self.quantizations}")
        return self

    @field_validator("hubs")
    @classmethod
    def _has_huggingface(cls, hubs: Dict[str, str]) -> Dict[str, str]:
        if "huggingface" not in hubs:
            raise ValueError("a 'huggingface' repository id is required")
        for hub, repo in hubs.items():
            if repo.count("/") != 1 or " " in repo:
                raise ValueError(f"{hub} id {repo!r} is not of the form 'owner/name'")
        return hubs


class _Family(_Strict):
    model_name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    description: str
    abilities: List[Ability]
    languages: List[str] = Field(min_length=1)
    context_length: int = Field(gt=0)
    architectures: List[str] = Field(min_length=1)
    stop_tokens: List[StopToken] = Field(min_length=1)
    specs: List[Spec] = Field(min_length=1)
    virtualenv_packages: List[str] = []
    #: Xinference's parser for the model's tool calls; required with the 'tools' ability.
    tool_parser: Optional[Literal["llama3"]] = None

    @model_validator(mode="after")
    def _tools_have_a_parser(self):
        if ("tools" in self.abilities) != (self.tool_parser is not None):
            raise ValueError("the 'tools' ability and tool_parser go together: declare both or neither")
        return self

    @model_validator(mode="after")
    def _unique_sizes(self):
        keys = [(s.model_format, s.model_size_in_billions) for s in self.specs]
        if len(keys) != len(set(keys)):
            raise ValueError(f"duplicate model_format and model_size_in_billions in specs: {keys}")
        return self

    @model_validator(mode="after")
    def _vllm_fits(self):
        for spec in self.specs:
            if spec.vllm is not None and spec.vllm.max_model_len > self.context_length:
                raise ValueError(
                    f"{spec.model_size_in_billions}B vllm.max_model_len {spec.vllm.max_model_len} "
                    f"exceeds context_length {self.context_length}"
                )
        return self

    @field_validator("virtualenv_packages")
    @classmethod
    def _vllm_that_runs_mllama(cls, packages: List[str]) -> List[str]:
        for package, pinned in vllm_pins(packages):
            if not pinned or not all(v in VLLM_MLLAMA_VERSIONS for v in pinned):
                raise ValueError(
                    f"{package!r}: pin one vLLM release that runs Mllama (>= {VLLM_MIN}, <= {VLLM_MAX}), e.g. vllm=={VLLM_MAX}"
                )
        return packages

    @property
    def stop(self) -> List[str]:
        return [t.token for t in self.stop_tokens]

    @property
    def stop_token_ids(self) -> List[int]:
        return [t.id for t in self.stop_tokens]

    def to_xinference_dict(self) -> dict:
        """The family in Xinference's own catalog format (``version: 2`` JSON)."""
        return {
            "version": 2,
            "model_name": self.model_name,
            "model_description": self.description,
            "model_ability": list(self.abilities),
            "model_lang": list(self.languages),
            "context_length": self.context_length,
            "architectures": list(self.architectures),
            "model_type": "mllama",
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "chat_template": None,
            "tool_parser": self.tool_parser,
            "model_specs": [
                {
                    "model_format": s.model_format,
                    "model_size_in_billions": s.model_size_in_billions,
                    "model_src": {
                        hub: {"model_id": repo, "quantizations": list(s.quantizations)}
                        for hub, repo in s.hubs.items()
                    },
                }
                for s in self.specs
            ],
            "virtualenv": {"packages": list(self.virtualenv_packages)} if self.virtualenv_packages else None,
        }


class BaseFamily(_Family):
    """A pretrained family: raw-text completion, ``<|image|>`` where each image goes."""

    kind: Literal["base"]

    @field_validator("abilities")
    @classmethod
    def _generate_not_chat(cls, abilities: List[str]) -> List[str]:
        if "generate" not in abilities or "chat" in abilities:
            raise ValueError("a base family has the 'generate' ability and not 'chat'")
        return abilities


class InstructFamily(_Family):
    """An instruction-tuned family: chat through the official Llama 3.2 Vision template."""

    kind: Literal["instruct"]

    @field_validator("abilities")
    @classmethod
    def _chat(cls, abilities: List[str]) -> List[str]:
        if "chat" not in abilities:
            raise ValueError("an instruct family has the 'chat' ability")
        return abilities


Family = Annotated[Union[BaseFamily, InstructFamily], Field(discriminator="kind")]


class _FamilyFile(BaseModel):
    family: Family


def parse_family(text: str, source: str = "<string>") -> Union[BaseFamily, InstructFamily]:
    """Validate one spec file's YAML text; errors name ``source`` and the field.

    >>> parse_family("model_name: x\\nkind: chat\\n", "x.yaml")
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.SpecError: x.yaml: kind: Input tag 'chat' found using 'kind' does not match any of the expected tags: 'base', 'instruct'
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return _FamilyFile(family=data).family
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"][1:] if p not in ("base", "instruct"))
            if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc = "kind"
            lines.append(f"{source}: {loc or '<file>'}: {err['msg']}")
        raise SpecError("\n".join(lines)) from None


def spec_dir() -> Path:
    """Where the spec files are: ``xinf_llama_vision/model_specs`` once installed."""
    return Path(str(resources.files("xinf_llama_vision.model_specs")))


def load_families(directory: Optional[Path] = None) -> List[Union[BaseFamily, InstructFamily]]:
    """Every family in ``directory`` (default: the packaged specs), sorted by file name."""
    directory = Path(directory) if directory is not None else spec_dir()
    families = [parse_family(p.read_text(encoding="utf-8"), str(p)) for p in sorted(directory.glob("*.yaml"))]
    if not families:
        raise SpecError(f"{directory}: no *.yaml spec files found")
    names = [f.model_name for f in families]
    if len(names) != len(set(names)):
        raise SpecError(f"{directory}: duplicate model_name across files: {names}")
    return families
