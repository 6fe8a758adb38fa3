"""`run.py finetune --method dpo`: DPO (TRL's DPOTrainer) with a LoRA adapter on a run's preference pairs.

    DIR/adapter/          the DPO LoRA adapter (peft)
    DIR/merged/           the start model (the base, or --sft's merged model) + the adapter, merged
    DIR/card.toml         a model card for the merged model, as `finetune` writes it
    DIR/train_log.jsonl   per optimizer step: step, loss, learning rate, DPO rewards (chosen, rejected,
                          margin, accuracy)
    DIR/manifest.json     objective "dpo", base card and weights, pairs sha256, the SFT it starts from,
                          decontamination, settings, seed, versions, times
    DIR/trainer/          while training: transformers checkpoints (adapter, optimizer, scheduler, RNG)

The pairs are the run's pairs.jsonl (or, for a run made before pairs existed, computed from its stage
files without writing them: export.load_pairs). The prompt is the one SFT trains on (finetune.prompts:
the card's output template, in its chat template for a chat card), tokenized as SFT tokenizes it; each
answer ends with the end-of-text token. Pairs close to a held-out evaluation task are dropped as SFT
drops examples. The reference model is the start model (the adapter disabled).

Resume: the data order is fixed up front (one shuffle per epoch from the seed, laid out as one
sequence that the trainer reads in order), the trainer's checkpoints hold the adapter, optimizer,
scheduler and RNG state, and a killed run resumes from the newest complete checkpoint, so it ends with
the same adapter as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

from . import finetune as sft
from . import weights
from .config import ROOT, FinetuneCfg, load_card
from .errors import UserError
from .stages.ensemble import PAIRS
from .store import append_jsonl, dumps, read_jsonl, write_json, write_jsonl

TRAINER = "trainer"  # DIR/trainer/checkpoint-N: transformers' checkpoints


# ---------------------------------------------------------------- data

def load_pairs(run_dir: Path) -> tuple[list[dict], str]:
    """The run's preference pairs and their sha256 (of pairs.jsonl, or of the computed pairs)."""
    from .export import load_pairs as run_pairs

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory")
    path = run_dir / PAIRS
    if not path.is_file() and not (run_dir / "manifest.json").is_file():
        raise UserError(f"{run_dir}: no {PAIRS} and not a run directory to compute them from "
                        f"(run `python run.py ensemble --run {run_dir}`)")
    pairs = run_pairs(run_dir)
    if not pairs:
        raise UserError(f"{run_dir}: no preference pairs (no instance's outputs disagreed enough: see "
                        "[ensemble.pairs] in the README): nothing to train DPO on")
    for n, p in enumerate(pairs, 1):
        if not all(isinstance(p.get(k, ""), str) for k in ("instruction", "input", "chosen", "rejected")) \
                or not p.get("instruction") or not p.get("chosen") or not p.get("rejected"):
            raise UserError(f"{path}: pair {n}: needs string 'instruction', 'chosen' and 'rejected' (and 'input')")
    data = path.read_bytes() if path.is_file() else "".join(dumps(p) + "\n" for p in pairs).encode()
    return pairs, hashlib.sha256(data).hexdigest()


def encode_pairs(card, tok, prompt_texts: list[str], pairs: list[dict], max_length: int):
    """{prompt_ids, chosen_ids, rejected_ids} per pair, tokenized as finetune.encode tokenizes SFT's
    examples (the answer + end-of-text); a pair whose prompt leaves no room for an answer is skipped."""
    special = card.prompt_format != "chat"
    out, skipped = [], 0
    for text, p in zip(prompt_texts, pairs):
        p_ids = tok(text, add_special_tokens=special).input_ids
        if len(p_ids) >= max_length - 1:
            skipped += 1
            continue
        out.append({"prompt_ids": p_ids,
                    "chosen_ids": tok(p["chosen"], add_special_tokens=False).input_ids + [tok.eos_token_id],
                    "rejected_ids": tok(p["rejected"], add_special_tokens=False).input_ids + [tok.eos_token_id]})
    return out, skipped


def sequence(n: int, batch_size: int, grad_accum: int, seed: int, total: int) -> list[int]:
    """The pair index of every example the trainer reads, in order: epoch after epoch, each the
    finetune.order shuffle of (seed, epoch), cut at total optimizer steps."""
    need, idx, epoch = total * batch_size * grad_accum, [], 0
    while len(idx) < need:
        idx += [i for batch in sft.order(n, batch_size, seed, epoch) for i in batch]
        epoch += 1
    return idx[:need]


# ---------------------------------------------------------------- the SFT to start from

def check_sft(sft_dir: Path, run_dir: Path, card, card_path: Path) -> dict:
    """--sft must be a finished SFT `finetune` of the same run and base; returns what identifies it."""
    manifest_path = sft_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"--sft {sft_dir}: not a finetune output folder (no readable manifest.json)") from None
    if manifest.get("objective", "sft") != "sft":
        raise UserError(f"--sft {sft_dir}: a {manifest['objective']} fine-tune, not an SFT one")
    if manifest.get("run") != str(run_dir.resolve()):
        raise UserError(f"--sft {sft_dir}: a fine-tune of another run ({manifest.get('run')}), not {run_dir}")
    if manifest.get("base_card") != card.model_dump(mode="json") \
            or manifest.get("base_weights") != weights.record(card, card_path):
        raise UserError(f"--sft {sft_dir}: a fine-tune of another base model "
                        f"({(manifest.get('base_card') or {}).get('name')}), not {card.name}")
    if not manifest.get("finished") or not (sft_dir / "merged" / "config.json").is_file():
        raise UserError(f"--sft {sft_dir}: not finished (run its `finetune` command again to finish it)")
    adapter = sft_dir / "adapter" / "adapter_model.safetensors"
    return {"dir": str(sft_dir.resolve()), "dataset_sha256": manifest.get("dataset_sha256"),
            "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest() if adapter.is_file() else None}


# ---------------------------------------------------------------- the command

def dpo(run_dir: Path, base: str, out: Path, cfg: FinetuneCfg, templates_dir: Path | None = None,
        sft_dir: Path | None = None, max_steps: int | None = None, seed: int | None = None) -> Path:
    """Train DPO, merge, write the card; returns the card's path. A rerun on a finished DIR does nothing."""
    sft.need_packages("finetune --method dpo", ("torch", "transformers", "peft", "trl"))
    pairs, pairs_sha = load_pairs(run_dir)
    card, card_path = load_card(base)
    seed = cfg.seed if seed is None else seed
    cfg = sft.with_max_steps(cfg, max_steps)
    start = None
    if sft_dir is not None:
        start = check_sft(sft_dir, run_dir, card, card_path)
    folder = sft.base_folder(card, card_path)
    if sft.model_kind(folder) != "causal":
        raise UserError(f"{folder}: DPO needs a causal language model (TRL's DPOTrainer), not a seq2seq one")
    if sft_dir is not None:
        folder = sft_dir / "merged"  # the SFT model, merged in full precision: DPO's start and reference
    pairs, contamination = sft.decontaminate(pairs)
    if not pairs:
        raise UserError(f"{run_dir}: every preference pair is close to an evaluation task: nothing left to train on")

    identity = {"objective": "dpo", "run": str(run_dir.resolve()), "pairs_sha256": pairs_sha,
                "base_card": card.model_dump(mode="json"), "base_weights": weights.record(card, card_path),
                "sft": start, "settings": cfg.model_dump(mode="json"), "seed": seed}
    manifest = sft.open_out(out, identity, _versions(), decontamination=contamination, pairs=len(pairs))
    if manifest is None:
        return out / "card.toml"
    t0 = time.perf_counter()
    train(card, folder, pairs, out, cfg, seed, templates_dir or ROOT / "templates", manifest)
    manifest["train_s"] = round(manifest.get("train_s", 0) + time.perf_counter() - t0, 1)
    write_json(out / "manifest.json", manifest)
    sft.merge(card, folder, "causal", out, cfg)
    path = sft.write_card(out, card, sft.card_name(out),
                          "a DPO LoRA adapter trained on a run's preference pairs" + (" (on top of its SFT)" if start else ""),
                          "+ SFT + DPO (LoRA, merged)" if start else "fine-tuned with DPO (LoRA, merged)")
    sft.finish_out(out, manifest, path, out / TRAINER)
    return path


def _versions() -> dict:
    import importlib.metadata as md

    return {**sft._versions(), "trl": md.version("trl")}


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: transformers writes trainer_state.json last, so one without it
    was cut short by a kill."""
    found = sorted((p for p in (out / TRAINER).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    return next((p for p in found if (p / "trainer_state.json").is_file() and (p / "rng_state.pth").is_file()
                 and (p / "optimizer.pt").is_file()), None)


def train(card, folder: Path, pairs: list[dict], out: Path, cfg: FinetuneCfg, seed: int, templates_dir: Path,
          manifest: dict) -> None:
    sft._quiet_libraries()
    import datasets
    import torch
    import transformers
    from peft import LoraConfig, TaskType
    from trl import DPOConfig, DPOTrainer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    threads = int(os.environ.get("ENSEMBLE_INSTRUCT_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data, skipped = encode_pairs(card, tok, sft.prompts(card, tok, pairs, templates_dir), pairs, cfg.max_length)
    if not data:
        raise UserError(f"every prompt is longer than max_length ({cfg.max_length} tokens): raise [finetune] max_length")
    d = cfg.dpo
    lr = d.learning_rate or cfg.learning_rate / 10
    epochs = d.epochs or cfg.epochs
    per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = cfg.max_steps or math.ceil(epochs * per_epoch / cfg.grad_accum)
    manifest.update(too_long=skipped, device="cuda" if cuda else "cpu", steps=total,
                    method="qlora" if cuda and cfg.qlora else "lora", beta=d.beta, learning_rate=lr)
    rows = datasets.Dataset.from_list([data[i] for i in sequence(len(data), cfg.batch_size, cfg.grad_accum,
                                                                 seed, total)])

    model = sft._load_model(folder, "causal", cfg, cuda, for_training=True)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                      task_type=TaskType.CAUSAL_LM)
    args = DPOConfig(
        output_dir=str(out / TRAINER), beta=d.beta, loss_type=[d.loss_type], learning_rate=lr, max_steps=total,
        num_train_epochs=1, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type="linear", warmup_steps=int(cfg.warmup_ratio * total), weight_decay=cfg.weight_decay,
        max_grad_norm=1.0, max_length=cfg.max_length, train_sampling_strategy="sequential",  # order: sequence()
        seed=seed, data_seed=seed, bf16=cuda, fp16=False, logging_steps=1,
        save_strategy="steps", save_steps=cfg.save_every, save_total_limit=1, report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not cuda,
        # no activation checkpointing (TRL turns it on): small models; the newer name, if transformers has it
        **({"activation_checkpointing": False} if "activation_checkpointing" in DPOConfig.__dataclass_fields__
           else {"gradient_checkpointing": False}))

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):  # tokenized above, exactly as SFT tokenizes
            return dataset

        def _send_telemetry(self):  # TRL pings the hub (and asks it for a list of agents): a run looks nothing up
            pass

    log = out / "train_log.jsonl"
    resume = last_checkpoint(out)
    step = int(resume.name.split("-")[-1]) if resume else 0
    # steps after the checkpoint are trained again: their log lines go
    write_jsonl(log, [r for r in read_jsonl(log, "run") if r["step"] <= step] if log.exists() else [])
    with sft._progress() as bar:
        task = bar.add_task("dpo", total=total, completed=step, loss="")

        class Log(transformers.TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
                    append_jsonl(log, [{"step": state.global_step, "loss": round(float(logs["loss"]), 6),
                                        "lr": logs.get("learning_rate"),
                                        **{"reward_" + k.split("/")[1]: round(float(logs[k]), 6) for k in keys if k in logs}}])
                    bar.update(task, completed=state.global_step, loss=f"loss {logs['loss']:.3f}")

        trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=lora,
                          callbacks=[Log()])
        trainer.remove_callback(transformers.PrinterCallback)  # our progress bar and log instead of printed dicts
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.model.save_pretrained(out / "adapter.tmp")
    shutil.rmtree(out / "adapter", ignore_errors=True)
    (out / "adapter.tmp").rename(out / "adapter")
    tok.save_pretrained(out / "adapter")
    del trainer, model
    import gc

    gc.collect()
