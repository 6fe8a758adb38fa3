"""Pipeline presets (configs/*.toml) and model cards (quantized/*.toml), validated with pydantic.

Unknown keys and wrong types are errors, reported as one line naming the file and the key.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The folder that holds configs/, quantized/, templates/ and seeds/: the source checkout, or the
# copy that an installed package carries in ensemble_instruct/_data (see setup.py).
_CHECKOUT = Path(__file__).resolve().parent.parent
ROOT = _CHECKOUT if (_CHECKOUT / "quantized").is_dir() and (_CHECKOUT / "templates").is_dir() \
    else Path(__file__).resolve().parent / "_data"
CACHE = Path(os.environ.get("ENSEMBLE_INSTRUCT_CACHE", Path.home() / ".cache" / "ensemble-instruct"))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PerType(Strict):
    A: int = Field(ge=0)
    B: int = Field(ge=0)


class Source(Strict):
    """Where the weights are: exactly one of path, package (+file), hub_repo (+hub_file)."""
    path: Optional[str] = None  # a file or directory; relative to the card's folder
    package: Optional[str] = None  # an installed Python package holding the file
    file: Optional[str] = None  # file inside `package`
    assemble: bool = False  # call package.assemble(path) to build the file (split GGUF packages)
    hub_repo: Optional[str] = None  # Hugging Face repo id (needs the network)
    hub_file: Optional[str] = None  # a single file in hub_repo (GGUF); none = whole repo
    revision: Optional[str] = None  # hub_repo: a commit hash (or a tag/branch) pins the weights

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("path", "package", "hub_repo") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError("set exactly one of source.path, source.package, source.hub_repo")
        if self.package and not (self.file or self.assemble):
            raise ValueError("source.package needs source.file (or assemble = true)")
        if self.hub_repo and not self.revision:  # a repo's main branch changes under a run
            raise ValueError("source.hub_repo needs source.revision (a commit hash pins the weights)")
        return self


class Shape(Strict):
    """What `run.py plan` needs to know of a model it has not downloaded (a hub card): the
    weights' file's own header wins once it is on this machine."""
    n_layers: int = Field(ge=1)  # repeating blocks (T5: the decoder's)
    n_heads: int = Field(ge=1)
    n_kv_heads: Union[Annotated[int, Field(ge=1)], list[Annotated[int, Field(ge=1)]]]  # a list: per layer
    head_dim: Optional[int] = Field(None, ge=1)  # of K (default n_embd / n_heads)
    head_dim_v: Optional[int] = Field(None, ge=1)  # of V (default head_dim)
    n_embd: int = Field(ge=1)
    n_vocab: int = Field(ge=1)
    n_ff: int = Field(0, ge=0)  # feed-forward width
    sliding_window: int = Field(0, ge=0)
    tied: bool = False  # output layer = token embeddings
    file_gb: float = Field(0.0, ge=0)  # llama.cpp: the GGUF file's size, decimal GB as the hub shows it
    params: int = Field(0, ge=0)  # transformers: parameters, all of them
    embed_params: int = Field(0, ge=0)  # transformers: of them, embeddings and lm_head (not quantized)


class ModelCard(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    backend: Literal["llama_cpp", "transformers", "openai"]
    source: Optional[Source] = None
    quantization: str = "none"  # llama.cpp: the GGUF's (Q4_K_M, ...); transformers: none | 8bit | nf4 | fp4
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "auto"  # transformers compute dtype
    context: int = Field(2048, ge=64)
    prompt_format: Literal["plain", "chat"] = "plain"
    # llama.cpp: -1 all, 0 none (CPU), N layers; "auto": what `run.py plan` picks when a run opens
    gpu_layers: Union[Annotated[int, Field(ge=-1)], Literal["auto"]] = -1
    threads: int = Field(0, ge=0)  # CPU threads; 0 = all cores
    # llama.cpp: sequences decoded together; "auto": the largest (<= 16) `run.py plan` finds fitting
    parallel: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = 1
    # llama.cpp: requests scheduled together (continuous batching inside, fixed boundaries; default
    # 8 x parallel: a window ends with a tail where few slots are live); a kill redoes at most one
    window: Optional[int] = Field(None, ge=1)
    # llama.cpp KV layout (backends/llamacpp.py): auto = unified for requests that share a prefix
    kv: Literal["auto", "split", "unified"] = "auto"
    batch_size: int = Field(1, ge=1)  # transformers: prompts per generate() call
    # extra-output stage, for this model: its own prompt template (a file in the templates folder;
    # a base model needs a cue to answer) and stop strings added to [outputs] stop
    output_template: Optional[str] = None
    output_stop: list[str] = []
    shape: Optional[Shape] = None  # for `run.py plan` without the weights (see Shape)
    license: str = ""
    description: str = ""
    # openai backend
    base_url: Optional[str] = None
    base_urls: list[str] = []  # several servers of the same model: requests spread over them
    model: Optional[str] = None  # the server's model name
    api_key_env: Optional[str] = None  # name of the environment variable that holds the key
    extra_body: dict = Field(default_factory=dict)  # server-specific request fields (e.g. repeat_penalty)
    concurrency: int = Field(4, ge=1)  # requests in flight (over all servers)
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(5, ge=0)

    @model_validator(mode="after")
    def _backend_fields(self):
        if self.backend == "openai":
            if not ((self.base_url or self.base_urls) and self.model):
                raise ValueError("an openai card needs base_url (or base_urls) and model")
            if self.base_url and self.base_urls:
                raise ValueError("give base_url or base_urls, not both")
        elif self.source is None:
            raise ValueError(f"a {self.backend} card needs a [source] table")
        if self.backend == "transformers" and self.quantization not in ("none", "8bit", "nf4", "fp4"):
            raise ValueError("transformers quantization must be one of none, 8bit, nf4, fp4")
        return self

    @property
    def endpoints(self) -> list[str]:
        return [u.rstrip("/") for u in (self.base_urls or [self.base_url])]


class Sampling(Strict):
    temperature: float = Field(0.7, ge=0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)


class InstructionsCfg(Sampling):
    target: PerType = PerType(A=125, B=50)  # accepted machine instructions per type
    seeds_per_prompt: PerType = PerType(A=20, B=8)
    machine_per_prompt: PerType = PerType(A=4, B=2)
    novelty_threshold: float = Field(0.7, ge=0, le=1)
    max_requests_factor: int = Field(20, ge=1)  # stop a type after target x this many requests


class InstancesCfg(Sampling):
    # "fixed": the demonstrations written in templates/instances_{A,B}.txt (18 / 15), one prefix
    # shared by every request; {A = n, B = m}: n / m seed tasks sampled per request.
    demos: Union[Literal["fixed"], PerType] = "fixed"
    max_tokens: int = Field(512, ge=1)


class OutputsCfg(Strict):
    max_tokens: int = Field(256, ge=1)
    stop: list[str] = ["\n\n", "|EoS|"]  # as the reference implementation


class PairsCfg(Strict):
    """[ensemble.pairs]: preference pairs (chosen = the consensus, rejected = the answer the others
    agree with least), the rule in ensemble_instruct/pairs.py, measured in docs/pairs.md."""
    margin: float = Field(0.05, ge=0, lt=1)  # chosen's mean agreement minus rejected's must exceed it
    max_agreement_ratio: float = Field(0.8, gt=0, le=1)  # and rejected's at most this x chosen's (1: off)
    max_length_ratio: float = Field(2.0, ge=0)  # no pair when rejected is longer than this x chosen (0: off)
    flawed_rejected: bool = True  # a loop, echo or lead-in may be the rejected answer
    empty_rejected: bool = False  # an empty answer may be the rejected answer
    min_support: float = Field(0.0, ge=0, le=1)  # chosen's best agreement with one other must reach it

    @model_validator(mode="after")
    def _length_ratio(self):
        if 0 < self.max_length_ratio < 1:
            raise ValueError("max_length_ratio must be 0 (off) or at least 1")
        return self


class EnsembleCfg(Strict):
    threshold: float = Field(0.01, ge=0, lt=1)
    # selection rule (ensemble_instruct/rules.py): paper (the spec's, default), weighted,
    # weighted-f1, weighted-chrf, quorum; `run.py evaluate` compares them on gold answers
    rule: Literal["paper", "weighted", "weighted-f1", "weighted-chrf", "quorum"] = "paper"
    quorum: int = Field(0, ge=0)  # quorum rule: agreeing candidates needed (0 = a majority)
    pairs: PairsCfg = PairsCfg()


class DpoCfg(Strict):
    """[finetune.dpo]: `finetune --method dpo` (TRL's DPOTrainer); LoRA, batch, length and checkpoint
    settings come from [finetune]."""
    beta: float = Field(0.1, gt=0)  # how far from the reference (the start model) DPO may move
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    learning_rate: float = Field(0, ge=0)  # 0: a tenth of [finetune] learning_rate
    epochs: int = Field(0, ge=0)  # 0: [finetune] epochs (max_steps caps both)


class FinetuneCfg(Strict):
    """`run.py finetune`: LoRA (QLoRA on a CUDA GPU) on a run's kept examples. The defaults suit a
    7-13B base on a 24 GB card; configs/finetune-cpu.toml suits the tiny models on a CPU."""
    rank: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    learning_rate: float = Field(2e-4, gt=0)
    epochs: int = Field(3, ge=1)
    max_steps: int = Field(0, ge=0)  # optimizer steps; 0 = as many as `epochs` take
    batch_size: int = Field(4, ge=1)  # examples per forward pass
    grad_accum: int = Field(4, ge=1)  # forward passes per optimizer step
    max_length: int = Field(1024, ge=16)  # prompt + answer tokens; longer answers are cut
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    save_every: int = Field(25, ge=1)  # optimizer steps between checkpoints (a killed run resumes there)
    qlora: bool = True  # on a CUDA GPU: the base in bitsandbytes 4-bit nf4; on a CPU always plain LoRA
    seed: int = 0
    dpo: DpoCfg = DpoCfg()


class Config(Strict):
    seed: int = 0
    seeds_file: str = "seeds/seed_tasks.jsonl"
    templates_dir: str = "templates"
    generator: str  # model card path
    extra: list[str] = Field(min_length=2)  # extra-output model cards, in ensemble order
    instructions: InstructionsCfg = InstructionsCfg()
    instances: InstancesCfg = InstancesCfg()
    outputs: OutputsCfg = OutputsCfg()
    ensemble: EnsembleCfg = EnsembleCfg()
    # not part of a generation run's fingerprint: fine-tuning settings never block resuming a run
    finetune: FinetuneCfg = Field(FinetuneCfg(), exclude=True)

    _dir: Optional[Path] = PrivateAttr(None)  # the config file's folder

    def path(self, p: str) -> Path:
        """A relative path is relative to the config file's folder; if nothing is there, it names a
        bundled file (`quantized/smollm2-135m.toml`, `seeds/seed_tasks.jsonl`)."""
        path = Path(os.path.expanduser(p))
        if path.is_absolute():
            return path
        mine = self._dir / path if self._dir is not None else None
        if mine is not None and (mine.exists() or not (ROOT / path).exists()):
            return mine
        return ROOT / path

    def located(self, directory: Path | None) -> "Config":
        """This config, with relative paths resolved against `directory`."""
        self._dir = Path(directory).resolve() if directory is not None else None
        return self


def _loc(err: dict) -> tuple[str, ...]:
    # Union members' tags (`parallel.constrained-int`, `demos.PerType`) are pydantic's, not the file's keys
    return tuple(str(x) for x in err["loc"]
                 if not str(x).startswith(("constrained-", "literal[", "list[")) and str(x) not in _models())


def _models(cls=None) -> set[str]:
    """The names of our config classes, which pydantic puts in a union member's error location."""
    subs = (cls or Strict).__subclasses__()
    return {c.__name__ for c in subs} | {n for c in subs for n in _models(c)}


def _one_line(e: ValidationError) -> str:
    errs = e.errors()
    loc = _loc(errs[0])
    same = [x for x in errs if _loc(x)[:len(loc)] == loc]
    deeper = [x for x in same if len(_loc(x)) > len(loc)]
    if deeper:  # a union member took the value's shape and one of its fields failed: name that field
        errs, loc = deeper, _loc(deeper[0])
        same = [deeper[0]]
    err = errs[0]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif len(same) > 1:  # a value that no member of a union takes: what each would take
        msg = "expected " + " or ".join(dict.fromkeys(_wanted(x) for x in same)) + f" (got {err['input']!r})"
    else:
        msg = err["msg"] + (f" (got {err['input']!r})" if err["type"] == "literal_error" else "")
    key = ".".join(loc)
    return f"{key}: {msg}" if key else msg


def _wanted(err: dict) -> str:
    ctx = err.get("ctx") or {}
    if err["type"] == "literal_error":
        return ctx["expected"]
    if err["type"].startswith("int_"):
        return "an integer"
    if err["type"] in ("model_type", "dict_type"):
        return "a table"
    for k, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if k in ctx:
            return f"a number {word} {ctx[k]}"
    return err["msg"].removeprefix("Input should be ")


def _load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML ({e})") from None


def find_config(given: str | Path) -> Path:
    """A config file, or the name of a bundled preset (`-c paper` for configs/paper.toml)."""
    path = Path(given)
    if path.is_file():
        return path
    preset = ROOT / "configs" / f"{given}.toml"
    if os.sep not in str(given) and preset.is_file():
        return preset
    raise UserError(f"{given}: config file not found (a path, or a preset: "
                    f"{', '.join(sorted(p.stem for p in (ROOT / 'configs').glob('*.toml')))})")


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        return Config(**_load_toml(path)).located(path.parent)
    except ValidationError as e:
        raise UserError(f"{path}: {_one_line(e)}") from None


# The keys each backend reads: a key of another backend (gpu_layers on an openai card) would be
# silently ignored, so it is refused.
_SHARED = {"name", "backend", "description", "license", "shape", "context", "prompt_format",
           "output_template", "output_stop"}
BACKEND_KEYS = {
    "llama_cpp": _SHARED | {"source", "quantization", "gpu_layers", "threads", "parallel", "window", "kv"},
    "transformers": _SHARED | {"source", "quantization", "dtype", "batch_size"},
    "openai": _SHARED | {"base_url", "base_urls", "model", "api_key_env", "extra_body", "concurrency", "timeout_s", "retries"},
}


def _check_backend_keys(raw: dict, path: Path) -> None:
    keys = BACKEND_KEYS.get(raw.get("backend"))
    if keys is None:
        return  # an unknown backend: pydantic names the allowed ones
    for key in raw:
        if key not in keys and key in ModelCard.model_fields:
            users = [b for b, k in BACKEND_KEYS.items() if key in k]
            raise UserError(f"{path}: {key}: not a setting of {raw['backend']} cards "
                            f"(only of {' and '.join(users)} cards)")


def load_card(path: str | Path) -> tuple[ModelCard, Path]:
    given, path = str(path), Path(path)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    if not path.exists() and (ROOT / "quantized" / f"{path.name}.toml").exists():
        path = ROOT / "quantized" / f"{path.name}.toml"  # `--model NAME` works too
    if not path.exists():
        raise UserError(f"{given}: model card not found (a path, or a name listed by `python run.py models`)")
    raw = _load_toml(path)
    _check_backend_keys(raw, path)
    try:
        return ModelCard(**raw), path
    except ValidationError as e:
        raise UserError(f"{path}: {_one_line(e)}") from None


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


