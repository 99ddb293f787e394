"""The `abot` command line (typer). Each command loads a config, then calls one library function."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from abot.errors import AbotError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train small language models from scratch on MLX.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and inspect SentencePiece tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")
data_app = typer.Typer(no_args_is_help=True, help="Prepare training data (pre-tokenized shards).")
app.add_typer(data_app, name="data")
console = Console()

OVERRIDES = typer.Argument(None, help="Dotted overrides, e.g. train.total_steps=20 data.seq_len=128")


@app.command()
def train(config: str = typer.Argument(..., help="YAML config, e.g. configs/tiny.yaml"),
          overrides: Optional[List[str]] = OVERRIDES,
          resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in save_dir")):
    """Pre-train a model as the config says."""
    from abot.config import load_config
    from abot.train import train as run

    summary = run(load_config(config, overrides or []), resume=resume, console=console)
    final = summary.get("final_eval") or {}
    if final:
        console.print(f"Done: step {summary['final_step']}, eval loss {final['loss']:.4f}, ppl {final['ppl']:.2f}.")


def _finetune(stage: str, config: str, overrides: Optional[List[str]], resume: bool) -> None:
    from abot.config import load_config
    from abot.train import describe_eval, train as run

    summary = run(load_config(config, overrides or []), resume=resume, console=console, stage=stage)
    final = summary.get("final_eval") or {}
    if final:
        console.print(f"Done: step {summary['final_step']}, eval {describe_eval(final)}.")


@app.command()
def sft(config: str = typer.Argument(..., help="YAML config, e.g. configs/sft.yaml"),
        overrides: Optional[List[str]] = OVERRIDES,
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in save_dir")):
    """Supervised fine-tuning on conversations (loss on assistant tokens), from train.init_from."""
    _finetune("sft", config, overrides, resume)


@app.command()
def dpo(config: str = typer.Argument(..., help="YAML config, e.g. configs/dpo.yaml"),
        overrides: Optional[List[str]] = OVERRIDES,
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in save_dir")):
    """Preference tuning on chosen/rejected pairs: DPO (or train.loss: ipo, from train.init_from, also the
    frozen reference), or the reference-free orpo and simpo."""
    _finetune("dpo", config, overrides, resume)


@app.command()
def verify(config: str = typer.Argument(..., help="YAML config to check"),
           overrides: Optional[List[str]] = OVERRIDES,
           no_data: bool = typer.Option(False, "--no-data", help="Skip the dataset check (no network access)"),
           measure: bool = typer.Option(False, "--measure", help="Also run one training step and compare its "
                                        "peak memory with the estimate")):
    """Check a config and this machine before training: a checklist with the fix for each problem.

    Exit status 0 when nothing fails (warnings allowed), 1 otherwise.
    """
    from abot.verify import FAIL, report_table, run_checks

    results = run_checks(config, overrides or [], data=not no_data, measure=measure)
    console.print(report_table(results))
    failed = [c.name for c in results if c.status == FAIL]
    console.print(f"[bold red]{len(failed)} failed:[/] {', '.join(failed)}" if failed else "[green]Nothing failed.[/]",
                  highlight=False)
    raise typer.Exit(1 if failed else 0)


@app.command("list")
def list_entries(kind: Optional[str] = typer.Argument(None, help="optimizers, schedules, models, datasets, losses, "
                                                                "adapters")):
    """List what the registry knows: built-ins and installed plugins."""
    from abot import registry

    kinds = [kind] if kind else list(registry.KINDS)
    for name in kinds:
        if name not in registry.KINDS:
            import difflib

            close = difflib.get_close_matches(name, list(registry.KINDS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            raise AbotError(f"unknown kind '{name}'{hint} Kinds: {', '.join(registry.KINDS)}")
        table = Table(title=name, title_justify="left")
        for column in ("name", "from", "summary"):
            table.add_column(column)
        for entry in registry.KINDS[name].entries():
            source = entry.source if entry.source == "abot" else f"{entry.source} {entry.version}".strip()
            table.add_row(entry.name, source, entry.summary)
        console.print(table)


@tokenizer_app.command("train")
def tokenizer_train(config: str = typer.Argument(..., help="YAML config: data source, vocab_size, tokenizer_path"),
                    overrides: Optional[List[str]] = OVERRIDES,
                    force: bool = typer.Option(False, "--force", help="Replace an existing tokenizer")):
    """Train the SentencePiece BPE tokenizer at train.tokenizer_path on the configured data."""
    from pathlib import Path

    from abot.build import ensure_tokenizer
    from abot.config import load_config

    cfg = load_config(config, overrides or [])
    path = Path(cfg.train.tokenizer_path)
    if path.exists() and not force:
        raise AbotError(f"{path} already exists; pass --force to replace it")
    if force:
        path.unlink(missing_ok=True)
    tok = ensure_tokenizer(cfg, console.print)
    console.print(f"Wrote {path}: {tok.vocab_size} tokens, sha256 {tok.sha256[:12]}.")


@data_app.command("prepare")
def data_prepare(config: str = typer.Argument(..., help="YAML config: the text source and the tokenizer"),
                 overrides: Optional[List[str]] = OVERRIDES,
                 out: str = typer.Option(..., "--out", help="folder to write the shards into"),
                 max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="stop train after N tokens"),
                 max_eval_tokens: int = typer.Option(10_000_000, "--max-eval-tokens", help="stop eval after N tokens"),
                 shard_tokens: int = typer.Option(1 << 26, "--shard-tokens", help="tokens per shard file"),
                 force: bool = typer.Option(False, "--force", help="replace shards already in --out")):
    """Tokenize the configured data once into binary shards; train on them with data.source=shards data.dataset=DIR."""
    from abot.config import load_config
    from abot.data.shards import prepare

    meta = prepare(load_config(config, overrides or []), out, max_tokens=max_tokens, max_eval_tokens=max_eval_tokens,
                   tokens_per_shard=shard_tokens, force=force, say=console.print)
    total = meta["splits"]["train"]["total_tokens"]
    console.print(f"Wrote {out}: {total:,} train tokens ({meta['dtype']}). Train on them with: "
                  f"abot train {config} data.source=shards data.dataset={out}")


# --- inference, evaluation, export (abot/generate.py, abot/evaluate.py, abot/export.py) ---------------------

CKPT = typer.Argument(..., help="checkpoint file, e.g. checkpoints/tiny/step_00000300.ckpt")
TOKENIZER = typer.Option(None, "--tokenizer", help="SentencePiece model (default: the config's train.tokenizer_path)")
MAX_NEW = typer.Option(256, "--max-new-tokens", help="most tokens to generate")
TEMPERATURE = typer.Option(0.8, "--temperature", help="0 = greedy")
TOP_K = typer.Option(0, "--top-k", help="keep the k most likely tokens (0 = off)")
TOP_P = typer.Option(0.95, "--top-p", help="nucleus: keep the most likely tokens up to this mass (1 = off)")
SEED = typer.Option(0, "--seed", help="sampling seed")


@app.command()
def generate(checkpoint: str = CKPT, prompt: str = typer.Option("", "--prompt", "-p", help="text to continue"),
             max_new_tokens: int = MAX_NEW, temperature: float = TEMPERATURE, top_k: int = TOP_K,
             top_p: float = TOP_P, seed: int = SEED, tokenizer: Optional[str] = TOKENIZER):
    """Continue a prompt, streaming the text (KV-cached sampling)."""
    from abot.generate import check_sampling, load_for_inference, run_generate

    check_sampling(max_new_tokens, temperature, top_k, top_p)
    stats = run_generate(load_for_inference(checkpoint, tokenizer), prompt, write=print,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    Console(stderr=True).print(f"[dim]{stats['tokens']} tokens in {stats['seconds']:.2f} s "
                               f"({stats['tokens_per_s']:.1f} tokens/s)[/]")


@app.command()
def chat(checkpoint: str = CKPT, system: Optional[str] = typer.Option(None, "--system", help="system message"),
         max_new_tokens: int = MAX_NEW, temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P,
         seed: int = SEED, tokenizer: Optional[str] = TOKENIZER):
    """Chat in the terminal with the chat template; Ctrl-D or Ctrl-C quits, /reset clears the history."""
    from abot.generate import chat_loop, check_sampling, load_for_inference

    check_sampling(max_new_tokens, temperature, top_k, top_p)
    try:
        loaded = load_for_inference(checkpoint, tokenizer)
        if sys.stdin.isatty():
            import readline  # noqa: F401  (line editing for input())
        Console(stderr=True).print(f"[dim]{checkpoint} (step {loaded.step}). Ctrl-D to quit, /reset to clear.[/]")
        code = chat_loop(loaded, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


@app.command("eval")
def eval_command(checkpoint: str = CKPT,
                 overrides: Optional[List[str]] = typer.Argument(None, help="data.*/train.* overrides"),
                 data: Optional[List[str]] = typer.Option(None, "--data", help="YAML config (its data section) "
                                                          "or data.key=value; repeatable"),
                 split: str = typer.Option("eval", "--split", help="eval or train"),
                 steps: Optional[int] = typer.Option(None, "--steps", help="micro-batches (default train.eval_steps)"),
                 tokenizer: Optional[str] = TOKENIZER,
                 as_json: bool = typer.Option(False, "--json", help="print the result as JSON only")):
    """Held-out loss and perplexity (default: the checkpoint config's eval split)."""
    import json

    from abot.evaluate import evaluate_checkpoint, result_table

    result = evaluate_checkpoint(checkpoint, [*(data or []), *(overrides or [])], split, steps, tokenizer)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(result_table(result))


@app.command()
def export(checkpoint: str = CKPT, out: str = typer.Option(..., "--out", help="folder to write"),
           tokenizer: Optional[str] = TOKENIZER,
           force: bool = typer.Option(False, "--force", help="write into a non-empty folder"),
           merge: bool = typer.Option(False, "--merge", help="an adapter checkpoint: write the base with the "
                                      "adapters merged in (default: the adapters in PEFT's format)")):
    """Export as a Hugging Face Llama folder (config.json, model.safetensors, tokenizer files), or an adapter
    checkpoint's LoRA adapters in PEFT's format (adapter_config.json, adapter_model.safetensors)."""
    from abot.export import export_checkpoint

    export_checkpoint(checkpoint, out, tokenizer, say=console.print, force=force, merge=merge)


def main():
    """Entry point: user errors print one clear message, not a traceback."""
    try:
        app()
    except AbotError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C during training, or Ctrl-C outside the training loop
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
