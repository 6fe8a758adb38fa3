"""`run.py finetune`: LoRA on a run's kept examples, so that `evaluate` can tell whether the data helped.

    DIR/adapter/          the LoRA adapter (peft)
    DIR/merged/           base + adapter merged, a transformers folder (model + tokenizer)
    DIR/card.toml         a model card for the merged model: works wherever a card does
    DIR/train_log.jsonl   per optimizer step: step, loss, learning rate
    DIR/manifest.json     base card and weights, dataset sha256, decontamination, settings, seed,
                          versions, times
    DIR/checkpoint/       while training: adapter, optimizer, scheduler and RNG state

The training prompt is the one the extra-output stage and `evaluate` give this model (the card's
output template, in its chat template for a chat card), and the loss counts the answer tokens only,
so training and evaluation agree. On a CUDA GPU the base is loaded in 4-bit nf4 (QLoRA); on the CPU
in float32, where merging the adapter is exact. The data order derives from the seed and every
checkpoint holds the RNG state, so a killed run resumes to the same adapter as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

from . import tasksets, templates, weights
from .config import ROOT, FinetuneCfg, ModelCard, load_card
from .errors import UserError
from .rundir import versions
from .stages.ensemble import DATASET
from .store import append_jsonl, read_jsonl, write_json, write_jsonl



def _versions() -> dict:
    import importlib.metadata as md

    return {**versions(), "peft": md.version("peft")}


# ---------------------------------------------------------------- data

def load_examples(run_dir: Path) -> tuple[list[dict], str]:
    """The run's kept examples and the dataset file's sha256."""
    path = run_dir / DATASET
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory")
    if not path.is_file():
        raise UserError(f"{run_dir}: no {DATASET} (not a finished run: run `python run.py generate --out {run_dir}`)")
    records = read_jsonl(path, "user")
    if not records:
        raise UserError(f"{path}: no examples (the ensemble kept nothing): nothing to fine-tune on")
    for n, r in enumerate(records, 1):
        if not all(isinstance(r.get(k, ""), str) for k in ("instruction", "input", "output")) \
                or not r.get("instruction") or not r.get("output"):
            raise UserError(f"{path}: record {n}: needs string 'instruction' and 'output' (and 'input')")
    return records, hashlib.sha256(path.read_bytes()).hexdigest()


def decontaminate(examples: list[dict]) -> tuple[list[dict], dict]:
    """Drop examples close to a held-out evaluation task; what was dropped goes in the manifest."""
    tasks, names = tasksets.for_decontamination()
    hits = tasksets.contaminated(examples, tasks)
    bad = {h["index"] for h in hits}
    return [e for k, e in enumerate(examples) if k not in bad], {
        "against": names, "tasks": len(tasks), "rouge_l_above": tasksets.ROUGE_MAX, "ngram": tasksets.NGRAM,
        "dropped": len(hits), "examples": hits}


# ---------------------------------------------------------------- the base model

def base_folder(card: ModelCard, card_path: Path) -> Path:
    """A transformers folder for the card's weights; a GGUF (either backend) is converted once."""
    if card.backend == "openai":
        raise UserError(f"{card_path}: an openai card serves a model over HTTP; fine-tuning needs its weights "
                        "(a transformers or llama_cpp card)")
    path = weights.resolve(card, card_path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path}: not a model folder or a .gguf file")
        from .backends.hf import _gguf_to_safetensors

        path = _gguf_to_safetensors(card, path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json (not a transformers model folder)")
    return path


def model_kind(folder: Path) -> str:
    """causal | seq2seq; anything else (an encoder, a vision model) cannot learn to answer."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: transformers cannot read its config ({str(e).splitlines()[0]})") from None
    if config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise UserError(f"{folder}: a {config.model_type!r} model is not a causal or seq2seq language model")


# ---------------------------------------------------------------- prompts and tokens

def prompts(card: ModelCard, tok, examples: list[dict], templates_dir: Path) -> list[str]:
    """Exactly what `evaluate` and the extra-output stage send this model."""
    template = templates.load(card.output_template or "output.txt", templates_dir, templates.FIELDS["output"])
    texts = [templates.output_prompt(template, e["instruction"], e.get("input", "")) for e in examples]
    if card.prompt_format == "chat":
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                 for t in texts]
    return texts


def encode(card: ModelCard, tok, kind: str, prompt_texts: list[str], answers: list[str], max_length: int):
    """(input ids, labels) per example; labels are -100 on the prompt: the loss is the answer's.
    The answer ends with the end-of-text token, so the tuned model learns to stop."""
    special = card.prompt_format != "chat"  # as the transformers backend tokenizes prompts
    out, skipped = [], 0
    for p, a in zip(prompt_texts, answers):
        p_ids = tok(p, add_special_tokens=special).input_ids
        a_ids = tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id]
        if kind == "seq2seq":
            out.append((p_ids[:max_length], a_ids[:max_length]))
            continue
        if len(p_ids) >= max_length - 1:
            skipped += 1  # no room for an answer
            continue
        ids = (p_ids + a_ids)[:max_length]
        out.append((ids, [-100] * len(p_ids) + ids[len(p_ids):]))
    return out, skipped


def collate(torch, batch, pad_id: int, kind: str):
    """Right-padded tensors; padding is masked out of attention and loss."""
    def pad(seqs, value):
        n = max(map(len, seqs))
        return torch.tensor([s + [value] * (n - len(s)) for s in seqs])
    ids, labels = zip(*batch)
    x = pad(list(ids), pad_id)
    mask = pad([[1] * len(s) for s in ids], 0)
    return {"input_ids": x, "attention_mask": mask, "labels": pad(list(labels), -100)}


def order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a shuffle that depends only on (seed, epoch)."""
    idx = list(range(n))
    random.Random(f"{seed}/finetune/{epoch}").shuffle(idx)
    return [idx[k:k + batch_size] for k in range(0, n, batch_size)]


# ---------------------------------------------------------------- checkpoints

def _save_checkpoint(torch, out: Path, model, optim, sched, step: int) -> None:
    """Written to checkpoint.tmp, then swapped in: a kill leaves the old or the new one, whole."""
    from peft import get_peft_model_state_dict

    tmp, ck = out / "checkpoint.tmp", out / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({"adapter": get_peft_model_state_dict(model), "optim": optim.state_dict(),
                "sched": sched.state_dict(), "rng": torch.get_rng_state(), "step": step}, tmp / "state.pt")
    old = out / "checkpoint.old"
    if ck.exists():
        ck.rename(old)
    tmp.rename(ck)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(torch, out: Path):
    for name in ("checkpoint", "checkpoint.old"):  # .old: killed between the two renames
        if (out / name / "state.pt").is_file():
            return torch.load(out / name / "state.pt", weights_only=False)
    return None


# ---------------------------------------------------------------- the tuned model's card

def write_card(out: Path, base: ModelCard, name: str, trained: str = "a LoRA adapter trained on a run's kept examples",
               how: str = "fine-tuned with LoRA (merged)") -> Path:
    """A transformers card for DIR/merged with the base's prompt settings, so `evaluate` prompts the
    tuned model as it was trained. Relative source path: DIR can be moved."""
    hf = base.backend == "transformers"
    q = lambda v: json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    lines = [f"# Written by `run.py finetune`: {base.name} + {trained}.",
             f"name = {q(name)}", 'backend = "transformers"',
             f"description = {q(f'{base.name} {how}')}",
             f"quantization = {q(base.quantization if hf else 'none')}", f"dtype = {q(base.dtype if hf else 'auto')}",
             f"context = {base.context}", f"prompt_format = {q(base.prompt_format)}",
             f"batch_size = {base.batch_size if hf else 4}",
             f"license = {q(base.license)}"]
    if base.output_template:
        lines.append(f"output_template = {q(base.output_template)}")
    if base.output_stop:
        lines.append(f"output_stop = [{', '.join(map(q, base.output_stop))}]")
    lines += ["", "[source]", 'path = "merged"', ""]
    (out / "card.toml").write_text("\n".join(lines), encoding="utf-8")
    return out / "card.toml"


def open_out(out: Path, identity: dict, versions: dict, **facts) -> dict | None:
    """The fine-tune folder's manifest, started or resumed: None when this fine-tune is finished
    already; refused when the folder holds another one (any `identity` key differs)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    changed = [k for k, v in identity.items() if manifest.get(k) != v] if manifest else []
    if changed:
        raise UserError(f"{out} holds another fine-tune ({', '.join(changed)} differ); use a new --out")
    if manifest.get("finished") and (out / "card.toml").is_file():
        print(f"{out}: already finished")
        return None
    manifest.update(identity, **facts, versions=versions,
                    started=manifest.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(out / "manifest.json", manifest)
    return manifest


def finish_out(out: Path, manifest: dict, card: Path, scratch: Path) -> None:
    """Record the finished fine-tune and its card, then drop the checkpoints (`scratch`)."""
    manifest.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), card=str(card))
    write_json(out / "manifest.json", manifest)
    shutil.rmtree(scratch, ignore_errors=True)


def card_name(out: Path) -> str:
    """The tuned model's name: the output folder's, so two fine-tunes of one base differ."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", out.resolve().name).strip("-") or "tuned"


# ---------------------------------------------------------------- training

def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"))


def need_packages(command: str, packages: tuple[str, ...]) -> None:
    """Before any work: the training packages are installed (a clear error, not an ImportError)."""
    import importlib.util

    for pkg in packages:
        if importlib.util.find_spec(pkg) is None:
            raise UserError(f"{command} needs the package {pkg!r} (pip install -e '.[hf]')")


def with_max_steps(cfg: FinetuneCfg, max_steps: int | None) -> FinetuneCfg:
    """The config with --max-steps applied (None: the config's own)."""
    if max_steps is None:
        return cfg
    if max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {max_steps}")
    return cfg.model_copy(update={"max_steps": max_steps})


def finetune(run_dir: Path, base: str, out: Path, cfg: FinetuneCfg, templates_dir: Path | None = None,
             max_steps: int | None = None, seed: int | None = None) -> Path:
    """Train, merge, write the card; returns the card's path. A rerun on a finished DIR does nothing."""
    need_packages("finetune", ("torch", "transformers", "peft"))
    examples, data_sha = load_examples(run_dir)
    card, card_path = load_card(base)
    seed = cfg.seed if seed is None else seed
    cfg = with_max_steps(cfg, max_steps)
    folder = base_folder(card, card_path)
    kind = model_kind(folder)
    examples, contamination = decontaminate(examples)
    if not examples:
        raise UserError(f"{run_dir}: every kept example is close to an evaluation task: nothing left to train on")

    identity = {"run": str(run_dir.resolve()), "dataset_sha256": data_sha, "base_card": card.model_dump(mode="json"),
                "base_weights": weights.record(card, card_path),
                "settings": cfg.model_dump(mode="json", exclude={"dpo"}), "seed": seed}  # dpo: --method dpo's
    manifest = open_out(out, identity, _versions(), decontamination=contamination, examples=len(examples))
    if manifest is None:
        return out / "card.toml"
    t0 = time.perf_counter()
    train(card, folder, kind, examples, out, cfg, seed, templates_dir or ROOT / "templates", manifest)
    manifest["train_s"] = round(manifest.get("train_s", 0) + time.perf_counter() - t0, 1)
    write_json(out / "manifest.json", manifest)
    merge(card, folder, kind, out, cfg)
    path = write_card(out, card, card_name(out))
    finish_out(out, manifest, path, out / "checkpoint")
    return path


def _load_model(folder: Path, kind: str, cfg: FinetuneCfg, cuda: bool, for_training: bool):
    import torch
    import transformers

    auto = transformers.AutoModelForSeq2SeqLM if kind == "seq2seq" else transformers.AutoModelForCausalLM
    if cuda and for_training and cfg.qlora:  # QLoRA: the frozen base in 4-bit, adapters in bf16
        from peft import prepare_model_for_kbit_training

        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        model = auto.from_pretrained(folder, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0})
        return prepare_model_for_kbit_training(model)
    if cuda and for_training:
        return auto.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": 0})
    # the CPU, and any merge: full precision on the CPU (merging into 4-bit weights is lossy)
    dtype = torch.float32 if not cuda else torch.bfloat16
    return auto.from_pretrained(folder, dtype=dtype, device_map="cpu")


def _quiet_libraries() -> None:
    """peft imports bitsandbytes: import it first without its hub kernel lookup (backends/bnb.py). peft
    also calls a transformers attribute deprecated in favour of another (a FutureWarning about their
    code, not ours)."""
    import warnings

    from .backends import bnb

    try:
        bnb.load()
    except Exception:  # absent or unusable here: plain LoRA does without it, and peft checks for itself
        pass
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def train(card: ModelCard, folder: Path, kind: str, examples: list[dict], out: Path, cfg: FinetuneCfg,
          seed: int, templates_dir: Path, manifest: dict) -> None:
    _quiet_libraries()
    import torch
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model, set_peft_model_state_dict

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    threads = int(os.environ.get("ENSEMBLE_INSTRUCT_THREADS", "0") or 0)  # as the llama.cpp backend
    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data, skipped = encode(card, tok, kind, prompts(card, tok, examples, templates_dir),
                           [e["output"] for e in examples], cfg.max_length)
    if not data:
        raise UserError(f"every prompt is longer than max_length ({cfg.max_length} tokens): raise [finetune] max_length")
    manifest.update(too_long=skipped, device="cuda" if cuda else "cpu", method="qlora" if cuda and cfg.qlora else "lora")

    per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = cfg.max_steps or math.ceil(cfg.epochs * per_epoch / cfg.grad_accum)
    manifest["steps"] = total

    torch.manual_seed(seed)  # the adapter's initial weights
    model = _load_model(folder, kind, cfg, cuda, for_training=True)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                      task_type=TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM)
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0
        optim, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))

    step, log = 0, out / "train_log.jsonl"
    state = _load_checkpoint(torch, out)
    if state is not None:
        set_peft_model_state_dict(model, state["adapter"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])  # dropout goes on as if the run had never stopped
        step = state["step"]
    # steps after the checkpoint are trained again: their log lines go
    write_jsonl(log, [r for r in read_jsonl(log, "run") if r["step"] <= step] if log.exists() else [])
    model.train()
    device = next(p.device for p in params)
    with _progress() as bar:
        task = bar.add_task("finetune", total=total, completed=step, loss="")
        while step < total:
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                k = step * cfg.grad_accum + micro  # the k-th micro-batch of the whole run
                batches = order(len(data), cfg.batch_size, seed, k // per_epoch)
                batch = collate(torch, [data[i] for i in batches[k % per_epoch]], tok.pad_token_id, kind)
                loss = model(**{n: t.to(device) for n, t in batch.items()}).loss / cfg.grad_accum
                loss.backward()
                loss_sum += loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            lr = sched.get_last_lr()[0]
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            append_jsonl(log, [{"step": step, "loss": round(loss_sum, 6), "lr": lr}])
            bar.update(task, advance=1, loss=f"loss {loss_sum:.3f}")
            if step % cfg.save_every == 0 or step == total:
                _save_checkpoint(torch, out, model, optim, sched, step)
    model.save_pretrained(out / "adapter.tmp")
    shutil.rmtree(out / "adapter", ignore_errors=True)
    (out / "adapter.tmp").rename(out / "adapter")
    tok.save_pretrained(out / "adapter")
    del model, optim
    import gc

    gc.collect()


def merge(card: ModelCard, folder: Path, kind: str, out: Path, cfg: FinetuneCfg) -> None:
    """The base in full precision + the adapter, saved as one transformers folder (written whole)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    if (out / "merged" / "config.json").is_file():
        return
    base = _load_model(folder, kind, cfg, torch.cuda.is_available(), for_training=False)
    model = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    tmp = out / "merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(out / "adapter").save_pretrained(tmp)
    tmp.rename(out / "merged")
