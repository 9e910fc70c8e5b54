"""`shardwise-generate SOURCE --prompt TEXT`: sample text from a trained model on one process, to sanity-check it.

    shardwise-generate runs/tiny_moe/x --prompt "def main(" --max-new-tokens 64            # top-p sampling
    shardwise-generate exported/tiny_moe --prompt "import " --greedy                       # an exported HF dir

SOURCE: a run directory or DCP checkpoint (its config.yaml gives the model), a `shardwise-export --format torch`
directory (model.pt + config.yaml), or a Hugging Face directory (config.json + safetensors; the architectures
shardwise imports and the granitemoeshared it exports). The model runs in fp32 on the CPU unless --device
says otherwise. Tokenizer: --tokenizer (`byte` or a tokenizer.json), else the run's data.tokenizer, else the
HF directory's tokenizer.json, else the byte tokenizer the bundled corpus uses. Each new token re-runs the
model over the whole context (no key/value cache: this is a check, not a server), truncated to
model.max_seq_len; generation stops at the tokenizer's end-of-document token.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch


def load_model(source: str, config: Optional[str] = None):
    """(shardwise Transformer with the source's weights, eval mode; tokenizer spec the source implies)."""
    from .models.transformer import build_model
    p = Path(source).expanduser()
    if (p / "config.json").is_file():
        from .models.hf_configs import read_hf_config
        from .models.hf_io import load_hf_checkpoint, read_safetensors_dir
        hf = read_hf_config(p)
        if hf.get("model_type") == "granitemoeshared":
            from .models.hf_granite import config_from_granite, state_dict_from_granite
            cfg = config_from_granite(hf, name=p.name)
            state = state_dict_from_granite(read_safetensors_dir(p)[0], cfg)
        else:
            cfg, state = load_hf_checkpoint(p)
        tok = str(p / "tokenizer.json") if (p / "tokenizer.json").is_file() else "byte"
    elif (p / "model.pt").is_file() and (p / "config.yaml").is_file():
        from .fault_tolerance.weights import load_run_config
        run = load_run_config(p / "config.yaml")
        cfg, tok = run.model, run.data.tokenizer
        state = torch.load(p / "model.pt", map_location="cpu", weights_only=True)
    else:
        from .fault_tolerance.weights import DCPWeights, resolve_source
        src = resolve_source(p, config)
        cfg, tok = src.config.model, src.config.data.tokenizer
        state = DCPWeights(src.checkpoint).state_dict()
    model = build_model(cfg, seed=0)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval(), tok


def next_token(logits: torch.Tensor, *, greedy: bool, temperature: float, top_p: float,
               generator: torch.Generator) -> int:
    """One token from last-position logits [V]: argmax, or nucleus sampling at `temperature`."""
    if greedy or temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = sorted_p.cumsum(0) - sorted_p < top_p
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    pick = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
    return int(order[pick])


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8,
             top_p: float = 0.95, greedy: bool = False, seed: int = 0, device: str = "cpu") -> str:
    """The completion of `prompt` (the new text only)."""
    ids = tokenizer.tokenize(prompt)
    if not ids:
        raise ValueError("--prompt is empty after tokenization: give at least one character")
    vocab = min(tokenizer.vocab_size, model.cfg.vocab_size)  # embedding rows past the tokenizer are padding
    gen = torch.Generator().manual_seed(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        ctx = (ids + new)[-model.cfg.max_seq_len:]
        logits = model(torch.tensor([ctx], device=device)).logits[0, -1, :vocab].cpu()
        tok = next_token(logits, greedy=greedy, temperature=temperature, top_p=top_p, generator=gen)
        if tok == tokenizer.eod:
            break
        new.append(tok)
    return tokenizer.detokenize(new)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardwise-generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("source", help="run directory, DCP checkpoint, torch export or Hugging Face directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tokenizer", help="`byte` or a tokenizer.json (default: what the source implies)")
    p.add_argument("--config", help="the run's config.yaml when it is not in or above a checkpoint")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or not 0 < args.top_p <= 1:
        p.error("--max-new-tokens must be >= 1 and --top-p in (0, 1]")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from .fault_tolerance.checkpoint import CheckpointError
    from .models.hf_configs import HFConversionError
    from .trainer.data.errors import DataError
    from .trainer.data.tokenizer import build_tokenizer
    try:
        model, tok_spec = load_model(args.source, args.config)
        tokenizer = build_tokenizer(args.tokenizer or tok_spec)
        text = generate(model.to(args.device), tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, greedy=args.greedy, seed=args.seed,
                        device=args.device)
    except (CheckpointError, HFConversionError, DataError, FileNotFoundError, ValueError) as e:
        print(f"shardwise-generate: {e}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
