"""``histoscope train-chat``: LLaVA's two stages on a conversations file, from one recipe.

Stage 1 trains the compressor and projector with the language model frozen (it learns
to put image tokens where the LM understands them); stage 2 trains them with the LM,
in full or through LoRA adapters. The loss is next-token cross-entropy over the
answers only. Each stage keeps its lowest-validation-loss epoch.

Output folder::

    OUT/config.yaml       the recipe as run (a rerun with another recipe refuses)
    OUT/splits.csv        each usable conversation's id and split (train/val)
    OUT/tokenizer/        the tokenizer (the LM folder's, a given one, or a BPE trained on the conversations)
    OUT/stage1.pt         the assistant after stage 1 (projector and resampler; the LM as it came)
    OUT/model.pt          the trained assistant (Assistant.load / histoscope chat)
    OUT/adapter/          with stage2.lm=lora: the adapters in peft's format
    OUT/history.json      per-stage, per-epoch losses and learning rate
    OUT/stage{1,2}_state.pt  while a stage is unfinished; a rerun resumes from it

Exact resumption: the initial weights come from ``seed``, each epoch's order from
``(seed, stage, epoch)`` and torch's generator is reseeded every epoch.

Notation: B conversations per batch, T tokens, N image tokens in, D their width.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.io.atomic import atomic_path, remove_stale_partials, write_json
from histoscope.io.checkpoint import read_checkpoint
from histoscope.io.conversations import Conversation, read_conversations
from histoscope.language.chat import (
    IGNORE_INDEX,
    ChatTokenizer,
    apply_lora,
    build_chat_model,
    get_template,
    image_tokens_of,
    save_adapter,
    save_chat_model,
    train_chat_tokenizer,
)
from histoscope.language.chat.trained import chat_model_path, chat_tokenizer_path, save_chat_tokenizer
from histoscope.train.chat.config import ChatConfig, StageConfig
from histoscope.train.config import ConfigError, record_recipe
from histoscope.train.loop import AdamWSchedule, EarlyStopping, close_epoch, derived_seed, resume_fit
from histoscope.utils.device import autocast, resolve_device, resolve_dtype
from histoscope.utils.progress import StepProgress

__all__ = ["ImageTokenStore", "train_chat"]

_RESUME_FREE = {"device", "out"}
_CACHE_BYTES = 1 << 30  # image tokens kept in memory across epochs


class ImageTokenStore:
    """Each image's tokens ``(N, D)``, read once (features files) or encoded once by the
    frozen tile encoder (tile images), kept in memory up to a budget."""

    def __init__(self, encoder: torch.nn.Module | None = None):
        self.encoder = encoder
        self._cache: dict[Path, torch.Tensor] = {}
        self._bytes = 0

    def __call__(self, path: Path) -> torch.Tensor:
        if path in self._cache:
            return self._cache[path]
        tokens = image_tokens_of(path, encoder=self.encoder)
        if self._bytes + tokens.numel() * 4 <= _CACHE_BYTES:
            self._cache[path] = tokens
            self._bytes += tokens.numel() * 4
        return tokens


def _check_run(out: Path, config: ChatConfig, overwrite: bool) -> None:
    names = ("stage1_state.pt", "stage2_state.pt", "stage1.pt", "model.pt", "history.json", "splits.csv")
    if overwrite:
        for name in names:
            (out / name).unlink(missing_ok=True)
        for folder in (chat_tokenizer_path(out), out / "adapter"):
            shutil.rmtree(folder, ignore_errors=True)
    started = any((out / name).exists() for name in names[:4]) or chat_tokenizer_path(out).is_dir()
    record_recipe(out, config, resume=started, resume_free=_RESUME_FREE)


def _split(items: list[Conversation], config: ChatConfig, out: Path) -> list[str]:
    n_val = round(config.val_fraction * len(items)) if len(items) > 1 else 0
    roles = ["train"] * len(items)
    for j in np.random.default_rng(config.seed).permutation(len(items))[:n_val]:
        roles[j] = "val"
    with atomic_path(out / "splits.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "split", "image"])
        writer.writerows([item.id, role, "" if item.image is None else str(item.image)]
                         for item, role in zip(items, roles))
    return roles


def _tokenizer(config: ChatConfig, out: Path, items: list[Conversation], log) -> ChatTokenizer:
    if chat_tokenizer_path(out).is_dir():  # a resumed run keeps its tokenizer
        return ChatTokenizer.load(chat_tokenizer_path(out))
    source = config.tokenizer or config.model.lm_path
    if source is not None:
        tokenizer = ChatTokenizer.load(source)
    else:
        template = get_template(config.template)
        texts = template.texts() + [text for item in items for turn in item.turns for text in turn]
        texts += [f"{template.sep}{answer.strip()}" for item in items for _, answer in item.turns]
        tokenizer = train_chat_tokenizer(texts, vocab_size=config.vocab_size)
        log(f"trained a byte-level BPE tokenizer on {len(items)} conversations: {len(tokenizer)} tokens")
    save_chat_tokenizer(tokenizer, out)
    return tokenizer


def _arch(config: ChatConfig, tokenizer: ChatTokenizer, image_dim: int) -> dict[str, Any]:
    m = config.model
    lm_config = dict(m.lm_config)
    if m.lm_path is None:  # from scratch: the vocabulary and special tokens are the tokenizer's
        lm_config.setdefault("vocab_size", len(tokenizer))
        lm_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return {"image_dim": image_dim, "lm_path": m.lm_path, "lm_config": lm_config, "projector": m.projector,
            "compressor": m.compressor, "num_image_tokens": m.num_image_tokens, "resampler": dict(m.resampler),
            "pool_heads": m.pool_heads}


def _encoder(config: ChatConfig, device: torch.device):
    if config.model.encoder is None:
        return None, None
    from histoscope.encoders import load_tile_encoder

    m = config.model
    encoder = load_tile_encoder(m.encoder, weights=m.encoder_weights, device=device, **m.encoder_arch)
    encoder.requires_grad_(False)
    return encoder, {"name": m.encoder, "weights": m.encoder_weights, "arch": dict(m.encoder_arch)}


def _usable(items: list[Conversation], store: ImageTokenStore, log) -> tuple[list[Conversation], int | None]:
    """The items whose image can be read, and the image tokens' width D (None: text only)."""
    kept, dims = [], set()
    for item in items:
        if item.image is not None:
            try:
                dims.add(store(item.image).shape[-1])
            except (ValueError, OSError) as error:
                log(f"skipped item {item.id}: {error}")
                continue
        kept.append(item)
    if len(dims) > 1:
        raise ValueError(f"the images' tokens have different widths {sorted(dims)}: features of different encoders? "
                         "Use one encoder for every slide and tile")
    return kept, dims.pop() if dims else None


class _Encoded:
    """The conversations as token ids and answer labels, batched with right padding."""

    def __init__(self, items: list[Conversation], ids: list[list[int]], labels: list[list[int]], pad_id: int,
                 store: ImageTokenStore):
        self.items, self.ids, self.labels, self.pad_id, self.store = items, ids, labels, pad_id, store

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, rows: list[int]) -> _Encoded:
        return _Encoded([self.items[i] for i in rows], [self.ids[i] for i in rows], [self.labels[i] for i in rows],
                        self.pad_id, self.store)

    def batch(self, rows, device: torch.device) -> dict[str, torch.Tensor | None]:
        width = max(len(self.ids[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(self.ids[i])
            ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(self.ids[i]), torch.tensor(self.labels[i]), 1
        images = [self.store(self.items[i].image) for i in rows if self.items[i].image is not None]
        tokens = image_mask = None
        if images:
            n_max = max(len(t) for t in images)
            tokens = torch.zeros(len(images), n_max, images[0].shape[-1])
            image_mask = torch.zeros(len(images), n_max, dtype=torch.bool)
            for r, t in enumerate(images):
                tokens[r, :len(t)], image_mask[r, :len(t)] = t, True
            tokens, image_mask = tokens.to(device), image_mask.to(device)
        return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device),
                "tokens": tokens, "image_mask": image_mask}


def _encode(items: list[Conversation], tokenizer: ChatTokenizer, config: ChatConfig, k: int, store, log) -> _Encoded:
    template = get_template(config.template)
    kept, all_ids, all_labels = [], [], []
    for item in items:
        ids, labels = template.encode(tokenizer, item.turns, image_tokens=k if item.image is not None else 0)
        ids, labels = ids[: config.max_length], labels[: config.max_length]
        if item.image is not None and ids.count(-200) != k:  # the cut went through the image
            log(f"skipped item {item.id}: its image does not fit in max_length={config.max_length} tokens")
            continue
        if all(label == IGNORE_INDEX for label in labels):
            log(f"skipped item {item.id}: no answer token within max_length={config.max_length}")
            continue
        kept.append(item)
        all_ids.append(ids)
        all_labels.append(labels)
    return _Encoded(kept, all_ids, all_labels, tokenizer.pad_token_id, store)


def _loss(model, data: _Encoded, rows, device, dtype) -> torch.Tensor:
    batch = data.batch(rows, device)
    with autocast(device, dtype):
        image_embeds = None if batch["tokens"] is None else model.image_tokens(batch["tokens"], batch["image_mask"])
        out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], image_embeds=image_embeds)
    return out.loss


def _batches(n: int, batch_size: int, order: np.ndarray | None = None) -> list[np.ndarray]:
    indices = np.arange(n) if order is None else order
    return [indices[i : i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def _validate(model, data: _Encoded, batch_size: int, device, dtype) -> float:
    model.eval()
    total = 0.0
    for rows in _batches(len(data), batch_size):
        total += float(_loss(model, data, rows.tolist(), device, dtype)) * len(rows)
    return total / len(data)


def _set_trainable(model, lm: str) -> None:
    model.requires_grad_(True)
    if lm == "frozen":
        model.lm.requires_grad_(False)
    # lora: peft has frozen the base LM and left only the adapters trainable


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def _fit_stage(number: int, stage: StageConfig, model, train: _Encoded, val: _Encoded, *, config: ChatConfig,
               out: Path, device, dtype, log, progress: bool, on_epoch_end) -> list[dict[str, Any]]:
    """Train one stage (resuming from its state file); leaves ``model`` at its best epoch."""
    _set_trainable(model, stage.lm)
    steps_per_epoch = len(_batches(len(train), stage.batch_size))
    opt = AdamWSchedule.from_groups(_param_groups(model, stage.weight_decay), stage, steps_per_epoch=steps_per_epoch,
                                    device=device, dtype=dtype)
    early = EarlyStopping(stage.epochs + 1, lower_is_better=True)
    state_path = out / f"stage{number}_state.pt"
    early, history, best_state, first_epoch = resume_fit(state_path, model, opt, early)
    if first_epoch:
        log(f"stage {number}: resuming after epoch {first_epoch}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"stage {number}: LM {stage.lm}, {trainable:,} trainable parameters, {stage.epochs} epochs")
    remaining = (stage.epochs - first_epoch) * steps_per_epoch
    bar = StepProgress(f"train-chat stage {number}", remaining) if progress and remaining > 0 else None
    try:
        for epoch in range(first_epoch, stage.epochs):
            started = time.perf_counter()
            torch.manual_seed(derived_seed(config.seed, number, epoch))
            model.train()
            order = np.random.default_rng([config.seed, number, epoch]).permutation(len(train))
            total = 0.0
            for rows in _batches(len(train), stage.batch_size, order):
                opt.optimizer.zero_grad(set_to_none=True)
                loss = _loss(model, train, rows.tolist(), device, dtype)
                opt.scaler.scale(loss).backward()
                opt.step(model, stage.grad_clip)
                total += float(loss.detach()) * len(rows)
                if bar is not None:
                    bar.advance(f"epoch {epoch + 1}/{stage.epochs} loss {float(loss.detach()):.4f}")
            record = {"stage": number, "epoch": epoch, "train_loss": total / len(train),
                      "lr": opt.optimizer.param_groups[0]["lr"]}
            val_loss = _validate(model, val, stage.batch_size, device, dtype) if len(val) else None
            best_state = close_epoch(record, val_loss=val_loss, model=model, opt=opt, early=early, history=history,
                                     best_state=best_state, started=started, state_path=state_path,
                                     label=f"stage {number} epoch {epoch + 1}/{stage.epochs}", log=log)
            if on_epoch_end is not None:
                on_epoch_end(stage=number, epoch=epoch, record=record, model=model)
    finally:
        if bar is not None:
            bar.close()
    model.load_state_dict(best_state)
    return history


def _load_stage1(model, path: Path) -> list[dict[str, Any]]:
    checkpoint = read_checkpoint(path, kind="chat")
    state = checkpoint["state_dict"]
    expected = model.state_dict()
    if not set(state) <= set(expected) or any(k not in state for k in expected if not k.startswith("lm.")):
        raise ValueError(f"{path}: does not fit the assistant this recipe builds; use another out, or --overwrite")
    model.load_state_dict(state, strict=False)
    return checkpoint.get("history", [])


def train_chat(config: ChatConfig, *, overwrite: bool = False, log: Callable[[str], None] | None = None,
               progress: bool = False, on_epoch_end: Callable[..., None] | None = None,
               on_stage_start: Callable[..., None] | None = None) -> dict[str, Any]:
    """Run both stages; returns ``{"model": OUT/model.pt, "history": [...]}``.

    A rerun into the same ``out`` resumes an interrupted run and returns at once for a
    finished one. ``on_stage_start(stage=, model=)`` runs before a stage trains (stage 2: before LoRA is attached),
    ``on_epoch_end(stage=, epoch=, record=, model=)`` after each epoch's state is saved.

    Examples
    --------
    >>> from histoscope.train.chat import load_chat_recipe, train_chat                           # doctest: +SKIP
    >>> train_chat(load_chat_recipe("chat_tiny", ["conversations=conv.json", "features_dir=feats"]))  # doctest: +SKIP
    """
    config.validate()
    log = log or (lambda message: None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, config, overwrite)
    remove_stale_partials(out)
    if chat_model_path(out).exists() and not (out / "stage2_state.pt").exists():
        log(f"{out}: already trained (model.pt); --overwrite to train again")
        return {"model": chat_model_path(out), "history": json.loads((out / "history.json").read_text())}

    items, problems = read_conversations(config.conversations, features_dir=config.features_dir,
                                         images_dir=config.images_dir)
    for problem in problems:
        log(f"skipped {problem}")
    device = resolve_device(config.device, option="device")
    dtype = resolve_dtype(None if config.precision == "auto" else config.precision, device)
    encoder, encoder_info = _encoder(config, device)
    store = ImageTokenStore(encoder)
    items, image_dim = _usable(items, store, log)
    if image_dim is None:
        if encoder is None:
            raise ValueError(f"{config.conversations}: no conversation has a readable image; an assistant needs "
                             "images (slide ids with features_dir, or image paths)")
        image_dim = encoder.model.num_features
    tokenizer = _tokenizer(config, out, items, log)
    arch = _arch(config, tokenizer, image_dim)
    torch.manual_seed(derived_seed(config.seed))  # the same initial weights on every rerun
    model = build_chat_model(**arch)
    vocab = model.base_lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the LM's vocabulary {vocab}: use the LM's "
                          "own tokenizer, or a larger lm_config.vocab_size")
    model = model.to(device)
    first_image = next(item.image for item in items if item.image is not None)
    with torch.no_grad():
        k = model.image_tokens(store(first_image)[None].to(device)).shape[1]
    data = _encode(items, tokenizer, config, k, store, log)
    roles = _split(data.items, config, out)
    train = data.subset([i for i, role in enumerate(roles) if role == "train"])
    val = data.subset([i for i, role in enumerate(roles) if role == "val"])
    if not len(train):
        raise ValueError(f"{config.conversations}: no conversation left for training")
    log(f"{len(train)} training and {len(val)} validation conversations, {k} image tokens each, device {device}, "
        f"{dtype}")
    fit = dict(config=config, out=out, device=device, dtype=dtype, log=log, progress=progress,
               on_epoch_end=on_epoch_end)
    save = dict(arch=arch, template=config.template, encoder=encoder_info)

    stage1_path = out / "stage1.pt"
    if stage1_path.exists():
        history = _load_stage1(model, stage1_path)
    else:
        if on_stage_start is not None:
            on_stage_start(stage=1, model=model)
        history = _fit_stage(1, config.stage1, model, train, val, **fit)
        save_chat_model(stage1_path, model, lm_trained=False, extra={"history": history}, **save)
        (out / "stage1_state.pt").unlink(missing_ok=True)

    if on_stage_start is not None:
        on_stage_start(stage=2, model=model)
    if config.stage2.lm == "lora":
        apply_lora(model, r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                   targets=config.lora.targets)
        model.to(device)
    history = history + _fit_stage(2, config.stage2, model, train, val, **fit)
    if config.stage2.lm == "lora":
        save_adapter(model, out / "adapter")
    save_chat_model(chat_model_path(out), model, lm_trained=config.stage2.lm != "frozen",
                    extra={"history": history}, **save)
    write_json(out / "history.json", history)
    (out / "stage2_state.pt").unlink(missing_ok=True)
    return {"model": chat_model_path(out), "history": history}
