"""The `ettin-jax` command line: subcommands that call the library and nothing more."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from data_pipelines.sources import SourceError
from data_pipelines.tokenizers import TokenizerError
from ettin_jax.config import Recipe, load_recipe, recipe_from_preset, recipe_to_yaml
from ettin_jax.errors import (
    CheckpointError,
    ConfigError,
    MetricsError,
    did_you_mean,
    first_line,
)
from ettin_jax.models.presets import PRESETS
from ettin_jax.platforms import select_platforms
from ettin_jax import storage
from ettin_jax.storage import StorageError


def _recipe_or_preset(spec: str, overrides: Sequence[str]) -> Recipe:
    """A recipe file path, or a model preset name wrapped in the default recipe."""
    if spec in PRESETS or not Path(spec).suffix:
        return recipe_from_preset(spec, overrides)
    return load_recipe(spec, overrides)


def _describe(args: argparse.Namespace) -> int:
    from ettin_jax.models.describe import describe_pair, format_description

    if args.hlo and not args.tpu_topology:
        args.parser.error("--hlo needs --tpu-topology (the HLO is the TPU program's)")
    recipe = _recipe_or_preset(args.recipe, args.overrides)
    if args.phase:
        from ettin_jax.training.phases import phase_named

        recipe = recipe.phase_recipe(phase_named(recipe, args.phase))
    report = describe_pair(
        recipe.model, seq_len=recipe.train.seq_len, mlm_mask_ratio=recipe.data.mlm_mask_ratio
    )
    if args.tpu_topology:
        from ettin_jax.training.aot import tpu_memory_report

        report["tpu"] = tpu_memory_report(recipe, args.tpu_topology, hlo_dir=args.hlo)
        if not args.json:
            print(json.dumps(report["tpu"], indent=2))
    print(json.dumps(report, indent=2) if args.json else format_description(report))
    return 0


def _recipe(args: argparse.Namespace) -> int:
    print(recipe_to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ettin_jax.hf.transfer import export_checkpoint

    for name, report in export_checkpoint(args.source, args.out, step=args.step).items():
        tokenizer = f", tokenizer: {', '.join(report.tokenizer_files)}" if report.tokenizer_files \
            else ", no tokenizer"
        print(f"{name or 'model'}: {report.path} ({report.tensors} tensors, "
              f"{report.elements:,} of {report.model_params:,} parameters{tokenizer})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from ettin_jax.hf.transfer import import_pretrained

    print(f"imported {args.source} -> {import_pretrained(args.source, args.out)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ettin_jax.hf.transfer import convert_objective

    print(f"{args.to}: {convert_objective(args.source, args.out, to=args.to)}")
    return 0


def _sources(args: argparse.Namespace) -> list:
    from data_pipelines.config import parse_source

    fields = {"field": args.field, "documents": args.documents}
    return [parse_source(text, **fields) for text in (args.sources or ["bundled"])]


def _tokenizer_train(args: argparse.Namespace) -> int:
    import itertools

    from data_pipelines.sources import SourceStats, iter_texts
    from data_pipelines.tokenizers import train_tokenizer

    sources = _sources(args)
    texts = itertools.chain.from_iterable(iter_texts(s, SourceStats()) for s in sources)
    tokenizer = train_tokenizer(args.out, vocab_size=args.vocab_size, texts=texts,
                                model_type=args.model_type, seed=args.seed)
    print(f"tokenizer: {args.out} (vocab {tokenizer.vocab_size}, special ids "
          f"{tokenizer.special_tokens.as_dict()})")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from data_pipelines.prepare import prepare
    from data_pipelines.tokenizers import load_tokenizer

    if args.passed_on and args.runner != "beam":
        args.parser.error(f"options after `--` ({' '.join(args.passed_on)}) are Beam pipeline "
                          f"options; add --runner beam")
    manifest = prepare(_sources(args), load_tokenizer(args.tokenizer), args.out,
                       documents_per_shard=args.documents_per_shard, workers=args.workers,
                       runner=args.runner, beam_options=args.passed_on)
    print(f"prepared {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
          f"{len(manifest['shards'])} shards: {storage.path(args.out) / 'manifest.json'}")
    for path, stats in manifest["source_stats"].items():
        print(f"  {path}: {stats}")
        if stats["bad_records_skipped"]:
            print(f"  warning: {stats['bad_records_skipped']:,} bad records skipped in {path}, "
                  f"the first: {stats['first_bad_record']}")
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from data_pipelines.inspection import dump_batches, render_row, source_summary
    from data_pipelines.pipeline import load_data_tokenizer, make_batch_iterator
    from ettin_jax.training.batch_sizing import phase_batch_size, phase_data_seed

    recipe = load_recipe(args.recipe, args.overrides)
    tokenizer = load_data_tokenizer(recipe.data)
    first = recipe.run_phases()[0]
    rows = phase_batch_size(first, 0, tokenizer=tokenizer).rows
    batches = make_batch_iterator(
        first.data, seq_len=first.train.seq_len, global_batch_size=rows,
        seed=first.train.seed, data_seed=phase_data_seed(first.train, 0),
        objective=args.objective, tokenizer=tokenizer,
    )
    dumped = [next(batches) for _ in range(args.batches)]
    for path, stats in batches.source_stats.items():
        print(f"source {path}: {stats.as_dict()}")
    print(source_summary(batches))
    print(render_row(dumped[0], tokenizer, objective=args.objective))
    if args.out:
        shapes = dump_batches(dumped, args.out)
        print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(args)
    if args.run_dir is None:
        raise ConfigError("train needs --run-dir DIR (or --dry-run)")
    _enable_compilation_cache(args)
    from ettin_jax.training.distributed import initialize
    from ettin_jax.training.trainer import train_pair

    initialize(coordinator=args.coordinator, num_processes=args.num_processes,
               process_id=args.process_id, cpu_devices=args.cpu_devices,
               peer_timeout_s=args.peer_timeout)
    recipe = load_recipe(args.recipe, args.overrides)
    results = train_pair(recipe, args.run_dir, only=args.only, force=args.force)
    for result in results.values():
        status = result.stopped or "done"
        print(f"{result.member}: step {result.step}, {result.tokens:,} tokens, loss "
              f"{result.loss if result.loss is None else round(result.loss, 4)} ({status})")
    return 3 if any(r.failed for r in results.values()) else 0


def _dry_run(args: argparse.Namespace) -> int:
    from ettin_jax.models.describe import format_description
    from ettin_jax.training.phases import format_run_plan, run_plan

    recipe = load_recipe(args.recipe, args.overrides)
    plan = run_plan(recipe, only=args.only)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(recipe_to_yaml(recipe), end="")
        print(f"\n{format_run_plan(plan)}\n\n{format_description(plan['describe'])}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    _enable_compilation_cache(args)
    from ettin_jax.training.evaluation import evaluate_run

    results = evaluate_run(args.run_dir, batches=args.batches, overrides=args.overrides)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for member, r in results.items():
        print(f"{member} (step {r['step']}, phase {r['phase']}): held-out loss "
              f"{r['eval_loss']:.4f}, perplexity {r['eval_perplexity']:.2f}, accuracy "
              f"{r['eval_accuracy']:.2%} over {r['eval_targets']:,} predicted tokens")
    return 0


def _enable_compilation_cache(args: argparse.Namespace) -> None:
    """The persistent compilation cache of `train` and `eval` (`ettin_jax.compilation_cache`),
    before their first compile."""
    from ettin_jax.compilation_cache import cache_directory, enable_compilation_cache

    enable_compilation_cache(cache_directory(args.compilation_cache))


def _add_compilation_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compilation-cache", metavar="DIR",
                        help="persistent compilation cache directory, or 'off' (default: "
                        "$ETTIN_JAX_COMPILATION_CACHE, else ~/.cache/ettin-jax/jax)")


def _fill_mask(args: argparse.Namespace) -> int:
    from ettin_jax.inference import fill_mask, load_model

    model, tokenizer = load_model(args.model, "encoder")
    for index, candidates in enumerate(fill_mask(model, tokenizer, args.text, top_k=args.top_k)):
        shown = ", ".join(f"{tokenizer.decode([token_id])!r} {probability:.3f}"
                          for _, token_id, probability in candidates)
        print(f"[MASK] {index + 1}: {shown}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from ettin_jax.inference import generate, load_model

    model, tokenizer = load_model(args.model, "decoder")
    result = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      seed=args.seed)
    print(f"{args.prompt}{result.text}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from ettin_jax.finetune.config import finetune_settings
    from ettin_jax.finetune.trainer import finetune, source_members

    if args.seeds < 1:
        args.parser.error(f"--seeds must be >= 1, got {args.seeds}")
    _enable_compilation_cache(args)
    from ettin_jax.training.distributed import initialize

    initialize(cpu_devices=args.cpu_devices)
    task, config = finetune_settings(args.task, args.overrides)
    run_dir = args.run_dir or args.source
    for member in [args.member] if args.member else source_members(args.source):
        summary = finetune(args.source, task, config, member=member, run_dir=run_dir,
                           seeds=args.seeds)
        stats = summary.summary[summary.headline]
        spread = (f" ± {stats['std']:.4f} (median {stats['median']:.4f}, {stats['n']} seeds)"
                  if stats["n"] > 1 else "")
        others = ", ".join(f"{name} {value['mean']:.4f}" for name, value in
                           summary.summary.items() if name != summary.headline)
        where = Path(run_dir) / "finetune" / task.name / member
        print(f"{task.name} {member}: {summary.headline} {stats['mean']:.4f}{spread}"
              f"{'; ' + others if others else ''} ({where})")
    return 0


def _lm_eval(args: argparse.Namespace) -> int:
    if {"-h", "--help"} & set(args.arguments):
        print(f"usage: ettin-jax lm-eval [lm-eval arguments ...]\n\n{args.parser.description}"
              f"\n\nlm-eval's own help follows.\n")
    _enable_compilation_cache(args)
    from ettin_jax.lm_harness import run_lm_eval_cli

    return run_lm_eval_cli(args.arguments)


def _compare(args: argparse.Namespace) -> int:
    from ettin_jax.report import compare_runs

    report = compare_runs(args.run_dirs, args.out)
    print(report.text, end="")
    print(f"report: {report.markdown}, chart: {report.chart}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from ettin_jax.plotting import plot_run

    report = plot_run(args.run_dir, args.out, x=args.x)
    print(f"plot: {report.path} (" + ", ".join(
        f"{m} {n} records" for m, n in report.records.items()) + ")")
    return 0


def _add_recipe_arguments(parser: argparse.ArgumentParser, metavar: str = "RECIPE",
                          help: str = "a recipe file (.yaml/.gin)") -> None:
    parser.add_argument("recipe", metavar=metavar, help=help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="SOURCE",
                        help="files, directories, globs, bundled[:SPLIT] or tfds:NAME[:SPLIT] "
                        "(default: the bundled corpus)")
    parser.add_argument("--field", default="text", help="JSON Lines / Parquet / TFDS text field")
    parser.add_argument("--documents", choices=("file", "blank_lines"), default="file",
                        help="text files: one document per file, or blank-line separated")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ettin-jax",
        description="Train paired masked-LM encoders and causal-LM decoders (Ettin) in JAX.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    describe = commands.add_parser(
        "describe",
        help="parameter counts and training FLOPs of the encoder and decoder",
        description="Parameter counts (total and non-embedding, from jax.eval_shape: no weights "
        "are allocated) and training FLOPs per token for both members of a pair.",
    )
    _add_recipe_arguments(describe, "PRESET_OR_RECIPE",
                          f"a recipe file (.yaml/.gin) or a preset: {', '.join(PRESETS)}")
    describe.add_argument("--json", action="store_true", help="print one JSON object")
    describe.add_argument("--phase", metavar="NAME",
                          help="describe this phase of the recipe (default: the first)")
    describe.add_argument("--tpu-topology", metavar="NAME",
                          help="also AOT-compile the train step for this TPU topology (e.g. "
                          "v5p:4x4x4; needs the tpu extra) and report per-chip memory")
    describe.add_argument("--hlo", metavar="DIR",
                          help="with --tpu-topology: write each member's compiled HLO text to "
                          "DIR/encoder.hlo.txt and DIR/decoder.hlo.txt and report its "
                          "collectives")
    describe.set_defaults(run=_describe, parser=describe)

    recipe = commands.add_parser(
        "recipe",
        help="validate a recipe and print it fully resolved",
        description="Load a recipe (.yaml or .gin) with overrides, validate every key, type and "
        "value, and print the resolved recipe as YAML.",
    )
    _add_recipe_arguments(recipe)
    recipe.set_defaults(run=_recipe, parser=recipe)

    train = commands.add_parser(
        "train",
        help="train the encoder and the decoder of a recipe",
        description="Train both members of the pair (or --only one) into RUN_DIR/encoder and "
        "RUN_DIR/decoder, on the same rows in the same order, through the recipe's phases. "
        "Rerunning the same command resumes from the latest complete checkpoint, in its phase "
        "and step.",
    )
    _add_recipe_arguments(train)
    train.add_argument("--run-dir", metavar="DIR", help="where checkpoints, metrics and the "
                       "resolved recipe go (required unless --dry-run)")
    train.add_argument("--only", choices=("encoder", "decoder"))
    train.add_argument("--dry-run", action="store_true",
                       help="print the resolved recipe, every member's phases and the describe "
                       "table; compile and train nothing")
    train.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    train.add_argument("--force", action="store_true",
                       help="continue RUN_DIR's checkpoints with a recipe that changes what the "
                       "run computes")
    train.add_argument("--coordinator", metavar="HOST:PORT",
                       help="multi-host: address of process 0 (TPU and SLURM need none)")
    train.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    train.add_argument("--process-id", type=int, help="multi-host: this process's index")
    train.add_argument("--peer-timeout", type=int, default=100, metavar="SECONDS",
                       help="multi-host: stop with an error when a peer is silent this long")
    train.add_argument("--cpu-devices", type=int,
                       help="run on N fake CPU devices (tests and debugging)")
    _add_compilation_cache_option(train)
    train.set_defaults(run=_train, parser=train)

    evaluate = commands.add_parser(
        "eval", help="held-out loss, perplexity and accuracy of both members of a run",
        description="Evaluate the latest checkpoint of each member in RUN_DIR on the recipe's "
        "held-out data (data.heldout) at the settings of that checkpoint's phase: loss, "
        "perplexity and accuracy (MLM: masked tokens; CLM: next token).",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value",
                          help="changes to RUN_DIR's recipe for this evaluation, e.g. "
                          "'data.heldout=[{path: held.jsonl}]'")
    evaluate.add_argument("--batches", type=int, help="held-out batches (default: "
                          "logging.eval_batches)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    _add_compilation_cache_option(evaluate)
    evaluate.set_defaults(run=_eval, parser=evaluate)

    fill = commands.add_parser(
        "fill-mask", help="encoder: the top-k tokens for each [MASK] in a text",
        description="Run the encoder of MODEL (a run directory, a member or step directory, or "
        "an exported HuggingFace directory) on TEXT and print the most likely tokens for each "
        "[MASK].",
    )
    fill.add_argument("model", metavar="MODEL")
    fill.add_argument("text", metavar="TEXT", help='e.g. "To be, or not to [MASK]"')
    fill.add_argument("--top-k", type=int, default=5)
    fill.set_defaults(run=_fill_mask, parser=fill)

    gen = commands.add_parser(
        "generate", help="decoder: continue a prompt (greedy or sampled, KV cache)",
        description="Continue PROMPT with the decoder of MODEL (a run directory, a member or "
        "step directory, or an exported HuggingFace directory): greedy at temperature 0, "
        "otherwise sampled after top-k and top-p filtering; one compiled step per token over "
        "a KV cache.",
    )
    gen.add_argument("model", metavar="MODEL")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=_generate, parser=gen)

    plot = commands.add_parser(
        "plot", help="PNG of the loss and learning-rate curves of a run",
        description="Draw RUN_DIR's loss and learning-rate curves, encoder and decoder side by "
        "side, with the phase boundaries, to RUN_DIR/plots/training.png (or --out).",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--out", metavar="FILE.png")
    plot.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis")
    plot.set_defaults(run=_plot, parser=plot)

    finetune = commands.add_parser(
        "finetune", help="fine-tune both members on a classification or regression task",
        description="Fine-tune the encoder and the decoder of SOURCE (a run directory, a member "
        "or step directory, or a HuggingFace directory) on TASK with the same settings, over "
        "--seeds seeds, into RUN_DIR/finetune/<task>/<member>/seed<k> (checkpoints, "
        "metrics.jsonl, results.json, hf/), and summarise the seeds in "
        "RUN_DIR/finetune/<task>/<member>/summary.json. Rerunning resumes.",
    )
    finetune.add_argument("source", metavar="SOURCE")
    finetune.add_argument("--task", required=True, help="a GLUE task (cola, sst2, mrpc, qqp, "
                          "stsb, mnli, qnli, rte), the bundled task, or a task file")
    finetune.add_argument("overrides", nargs="*", metavar="key=value",
                          help="settings, e.g. learning_rate=3e-5 epochs=2 pooling=mean")
    finetune.add_argument("--member", choices=("encoder", "decoder"),
                          help="only this member (default: every member SOURCE holds)")
    finetune.add_argument("--seeds", type=int, default=1, help="runs with seeds seed, "
                          "seed + 1, ... (default 1)")
    finetune.add_argument("--run-dir", metavar="DIR", help="where finetune/ goes (default: "
                          "SOURCE)")
    finetune.add_argument("--cpu-devices", type=int,
                          help="run on N fake CPU devices (tests and debugging)")
    _add_compilation_cache_option(finetune)
    finetune.set_defaults(run=_finetune, parser=finetune)

    compare = commands.add_parser(
        "compare", help="encoder vs decoder: pretraining and fine-tuning side by side",
        description="One report of encoder against decoder over RUN_DIRs (several: across "
        "sizes): held-out pretraining metrics and every fine-tuned task (mean, spread and "
        "median over seeds), as Markdown and a PNG chart in RUN_DIR/report/ (the first "
        "RUN_DIR's, or --out).",
    )
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", metavar="DIR", help="report folder (default: "
                         "RUN_DIR/report of the first)")
    compare.set_defaults(run=_compare, parser=compare)

    lm_eval = commands.add_parser(
        "lm-eval", help="lm-evaluation-harness with the ettin-jax model type (both members)",
        description="Runs lm-evaluation-harness's own command line with the model type "
        "`ettin-jax` registered (ettin_jax/lm_harness.py): e.g. `ettin-jax lm-eval --model "
        "ettin-jax --model_args path=RUN_DIR/decoder --tasks hellaswag --include_path DIR "
        "--batch_size 8`. Every argument is lm-eval's (`ettin-jax lm-eval --help`).",
        prefix_chars="+", add_help=False)  # every "-" option belongs to lm-eval
    lm_eval.add_argument("arguments", nargs=argparse.REMAINDER)
    lm_eval.set_defaults(run=_lm_eval, parser=lm_eval, compilation_cache=None)

    export = commands.add_parser(
        "export",
        help="native checkpoint(s) -> HuggingFace transformers directories",
        description="Export a run directory (both members, to OUT/encoder and OUT/decoder, by "
        "default RUN_DIR/encoder/hf and RUN_DIR/decoder/hf), a member directory or one "
        "checkpoint step as transformers ModernBERT directories "
        "(config.json, model.safetensors, tokenizer files). Encoders load with "
        "AutoModelForMaskedLM, decoders with AutoModelForCausalLM.",
    )
    export.add_argument("source", metavar="CHECKPOINT_OR_RUN_DIR")
    export.add_argument("--out", metavar="DIR",
                        help="output directory (default: <member dir>/hf)")
    export.add_argument("--step", type=int, help="checkpoint step (default: latest complete)")
    export.set_defaults(run=_export, parser=export)

    import_ = commands.add_parser(
        "import",
        help="HuggingFace ModernBERT/Ettin directory -> native checkpoint",
        description="Import a transformers ModernBERT or ModernBERT-decoder directory (e.g. a "
        "released Ettin checkpoint) as a native checkpoint that training can start from.",
    )
    import_.add_argument("source", metavar="HF_DIR")
    import_.add_argument("--out", required=True, metavar="DIR", help="output member directory")
    import_.set_defaults(run=_import, parser=import_)

    convert = commands.add_parser(
        "convert",
        help="decoder weights -> encoder, or encoder -> decoder",
        description="Give a model's weights to the other member of the pair (Ettin's "
        "cross-objective training). A HuggingFace directory gives a HuggingFace directory, a "
        "native checkpoint a native checkpoint.",
    )
    convert.add_argument("source", metavar="HF_DIR_OR_CHECKPOINT")
    convert.add_argument("--to", required=True, choices=("encoder", "decoder"))
    convert.add_argument("--out", required=True, metavar="DIR", help="output directory")
    convert.set_defaults(run=_convert, parser=convert)

    tokenizer = commands.add_parser("tokenizer", help="train tokenizers",
                                    description="Tokenizer commands.")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True,
                                                  metavar="COMMAND")
    train_tok = tokenizer_commands.add_parser(
        "train", help="train a SentencePiece tokenizer",
        description="Train a SentencePiece tokenizer ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, "
        "[MASK] 4) and write DIR/tokenizer.model plus the files transformers' AutoTokenizer "
        "loads with the same ids. The same sources and arguments give byte-identical files.",
    )
    train_tok.add_argument("--vocab-size", type=int, required=True)
    train_tok.add_argument("--out", required=True, metavar="DIR")
    train_tok.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    train_tok.add_argument("--seed", type=int, default=21,
                           help="seed of the sample of lines trained on when there are more "
                           "than 300,000 (the same inputs and seed give the same tokenizer)")
    _add_source_options(train_tok)
    train_tok.set_defaults(run=_tokenizer_train, parser=train_tok)

    data = commands.add_parser("data", help="prepare and inspect training data",
                               description="Data commands.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prepare = data_commands.add_parser(
        "prepare", help="tokenize sources into ArrayRecord shards",
        description="Tokenize sources into ArrayRecord shards with a manifest, on every core. "
        "Rerunning the same command after an interruption resumes it.",
    )
    _add_source_options(prepare)
    prepare.add_argument("--tokenizer", required=True, metavar="DIR")
    prepare.add_argument("--out", required=True, metavar="DIR")
    prepare.add_argument("--workers", type=int, help="processes (default: every core)")
    prepare.add_argument("--documents-per-shard", type=int, default=4096)
    prepare.add_argument(
        "--runner", choices=("local", "beam"), default="local",
        help="local: processes on this machine; beam: an Apache Beam pipeline, the "
        "DirectRunner with --workers processes unless Beam options after `--` say otherwise "
        "(e.g. -- --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp)")
    prepare.set_defaults(run=_data_prepare, parser=prepare)

    inspect = data_commands.add_parser(
        "inspect", help="dump batches and show a decoded row",
        description="Build batches from a recipe's data section, print the first row decoded "
        "(masked tokens shown), and optionally save the batches as .npz.",
    )
    _add_recipe_arguments(inspect)
    inspect.add_argument("--objective", choices=("mlm", "clm"), default="mlm")
    inspect.add_argument("--batches", type=int, default=1)
    inspect.add_argument("--out", metavar="FILE.npz")
    inspect.set_defaults(run=_data_inspect, parser=inspect)

    launch = commands.add_parser(
        "launch", help="run `ettin-jax train` on a TPU pod or a SLURM cluster",
        description="Start a training job on every host of a TPU slice or a SLURM allocation "
        "and bring it back after preemption, against the same run directory.")
    launch_commands = launch.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    _add_launch_tpu_parser(launch_commands)
    _add_launch_slurm_parser(launch_commands)
    return parser


# ---- launch tpu ----
def _add_launch_tpu_parser(launch_commands: argparse._SubParsersAction) -> None:
    """`ettin-jax launch tpu`."""
    tpu = launch_commands.add_parser(
        "tpu", help="train on a Cloud TPU slice (queued resource), relaunched after preemption",
        description="Validate RECIPE with its overrides, build a wheel of this checkout and "
        "upload it with requirements.lock and the resolved recipe to RUN_DIR/launch/, create "
        "a queued resource, install the wheel (every package at the lock's version) on every "
        "worker and run `ettin-jax train` there against RUN_DIR. When the slice is preempted "
        "or the job dies, delete the slice, create it again and rerun: training resumes from "
        "RUN_DIR's latest checkpoint. Deletes the queued resource at the end (Ctrl-C too).")
    _add_recipe_arguments(tpu)
    tpu.add_argument("--run-dir", required=True, metavar="gs://BUCKET/RUN",
                     help="the run directory every host and every relaunch shares")
    tpu.add_argument("--name", required=True, help="queued resource (and TPU node) name")
    tpu.add_argument("--zone", required=True, help="e.g. us-east5-a")
    tpu.add_argument("--accelerator-type", required=True, metavar="TYPE",
                     help="e.g. v5p-64, v5litepod-16, v6e-8")
    tpu.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    tpu.add_argument("--runtime-version", metavar="VERSION",
                     help="TPU VM runtime (default: the generation's, e.g. v2-alpha-tpuv5 for "
                     "v5p)")
    capacity = tpu.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_const", dest="provisioning", const="spot",
                          help="spot capacity (preemptible, cheaper)")
    capacity.add_argument("--reserved", action="store_const", dest="provisioning",
                          const="reserved", help="the project's reservation")
    tpu.add_argument("--max-retries", type=int, default=3, metavar="N",
                     help="relaunches after a preemption or failure (default 3)")
    tpu.add_argument("--queue-timeout", metavar="DURATION",
                     help="give up a request still waiting for capacity after this long "
                     "(e.g. 6h; default: wait)")
    tpu.add_argument("--poll-interval", type=float, default=30.0, metavar="SECONDS",
                     help="seconds between state checks (default 30)")
    tpu.add_argument("--dry-run", action="store_true",
                     help="print every command, one per line, and run nothing")
    tpu.set_defaults(run=_launch_tpu, parser=tpu, provisioning="on-demand")


def _launch_tpu(args: argparse.Namespace) -> int:
    from ettin_jax.launch.tpu import LaunchFailed, TpuLaunch, launch_tpu

    launch = TpuLaunch(
        recipe=args.recipe, overrides=tuple(args.overrides), run_dir=args.run_dir,
        name=args.name, zone=args.zone, accelerator_type=args.accelerator_type,
        project=args.project, runtime_version=args.runtime_version,
        provisioning=args.provisioning, max_retries=args.max_retries,
        poll_s=args.poll_interval, queue_timeout=args.queue_timeout)
    try:
        launch_tpu(launch, dry_run=args.dry_run)
    except LaunchFailed as err:
        print(f"{args.parser.prog}: error: {err}", file=sys.stderr)
        return 1
    return 0


# ---- launch slurm ----
def _add_launch_slurm_parser(launch_commands: argparse._SubParsersAction) -> None:
    """`ettin-jax launch slurm`."""
    from ettin_jax.launch import slurm

    parser = launch_commands.add_parser(
        "slurm", help="write and submit an sbatch script that trains on N nodes",
        description="Copy the recipe next to an sbatch script and submit it (`sbatch "
        "--parsable`, the job id on stdout): one task per node runs `ettin-jax train` (JAX "
        "finds its peers from SLURM's variables); USR1 --warn-seconds before the time limit "
        "stops the training with a checkpoint and requeues the job, at most --max-requeues "
        "times; a requeued job resumes from the run directory's latest checkpoint.")
    _add_recipe_arguments(parser)
    parser.add_argument("--run-dir", required=True, metavar="DIR",
                        help="the run directory, shared by the nodes (a path or gs://, s3://)")
    parser.add_argument("--nodes", type=int, required=True, metavar="N")
    parser.add_argument("--gpus-per-node", type=int, metavar="G",
                        help="GPUs per node, all driven by the node's one process")
    parser.add_argument("--cpus-per-task", type=int, metavar="C",
                        help="CPUs for each node's process (SLURM's default is 1)")
    parser.add_argument("--partition", metavar="P")
    parser.add_argument("--account", metavar="A")
    parser.add_argument("--time", metavar="HH:MM:SS", help="time limit of each start")
    parser.add_argument("--job-name", metavar="NAME", help="default: ettin-<run dir's name>")
    parser.add_argument("--max-requeues", type=int, default=slurm.DEFAULT_MAX_REQUEUES,
                        metavar="N", help="requeues after the time-limit warning (default "
                        "%(default)s)")
    parser.add_argument("--warn-seconds", type=int, default=slurm.DEFAULT_WARN_SECONDS,
                        metavar="S", help="the warning's lead on the time limit (default "
                        "%(default)s)")
    parser.add_argument("--launch-dir", metavar="DIR", help="shared directory for the script, "
                        "the recipe copy and the log (default RUN_DIR/slurm; required when "
                        "the run dir is a URL)")
    parser.add_argument("--executable", default=slurm.default_executable(), metavar="PATH",
                        help="the ettin-jax command on the nodes (default: %(default)s)")
    parser.add_argument("--train-option", action="append", default=[], metavar="OPT",
                        help="an `ettin-jax train` option, e.g. --train-option=--only=encoder")
    parser.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                        help="one more sbatch option, e.g. --sbatch-option=--mem=0")
    parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="a shell line run before training, e.g. 'module load cuda'")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every task")
    parser.add_argument("--allow-running", action="store_true",
                        help="submit even while a job of the same name is queued or running")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the script and the sbatch command; write and submit nothing")
    parser.set_defaults(run=_launch_slurm, parser=parser)


def _launch_slurm(args: argparse.Namespace) -> int:
    from ettin_jax.launch import slurm

    launch = slurm.prepare(slurm.SlurmJob(
        recipe=args.recipe, overrides=tuple(args.overrides), run_dir=args.run_dir,
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
        partition=args.partition, account=args.account, time=args.time,
        job_name=args.job_name, max_requeues=args.max_requeues, warn_seconds=args.warn_seconds,
        launch_dir=args.launch_dir, executable=args.executable,
        train_options=tuple(args.train_option), sbatch_options=tuple(args.sbatch_option),
        setup=tuple(args.setup), env=slurm.parse_env(args.env)))
    if args.dry_run:
        print(f"# {launch.script_path} (recipe copy: {launch.recipe_copy})\n{launch.script}"
              f"\n# submit: {' '.join(launch.sbatch)}")
        return 0
    job_id = slurm.submit(launch, allow_running=args.allow_running)
    print(job_id)
    print(f"submitted job {job_id} ({launch.job.job_name}): log "
          f"{launch.job.launch_dir}/slurm-{job_id}.out", file=sys.stderr)
    return 0


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line. `key=value` recipe overrides (and a command's other list
    arguments, such as data sources) may stand anywhere after the subcommand, before or after
    its options. Exits with status 2 and one clear line for anything else it cannot place,
    naming the option meant where a token looks like a mistyped one."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on: list[str] = []  # `data prepare ... -- BEAM_OPTION...`
    if argv[:2] == ["data", "prepare"] and "--" in argv:
        argv, passed_on = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args, extras = parser.parse_known_args(argv)
    args.passed_on = passed_on
    command: argparse.ArgumentParser = args.parser
    for token in [*getattr(args, "overrides", []), *extras]:
        mistake = _mistyped_option(token, command)
        if mistake:
            command.error(mistake)
    unplaced = []
    for token in extras:
        if hasattr(args, "overrides") and _OVERRIDE.match(token):
            args.overrides.append(token)
        elif hasattr(args, "sources") and not token.startswith("-"):
            args.sources.append(token)
        else:
            unplaced.append(token)
    if unplaced:
        takes = (" (recipe overrides are dotted key=value pairs, e.g. train.steps=5)"
                 if hasattr(args, "overrides") else "")
        command.error(f"unrecognized arguments: {' '.join(unplaced)}{takes}")
    return args


_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")


def _mistyped_option(token: str, command: argparse.ArgumentParser) -> str | None:
    """What is wrong with `token` when it looks like an option written the wrong way: a
    recipe override with dashes, an unknown option (with the closest one), or an option
    written as key=value. None for anything else."""
    options = [s for action in command._actions for s in action.option_strings
               if s.startswith("--")]
    if token.startswith("-"):
        name = token.lstrip("-").split("=", 1)[0]
        if "." in name and "=" in token:
            return (f"{token!r}: recipe overrides take no dashes; write "
                    f"{token.lstrip('-')}")
        return f"unrecognized option {token!r}.{did_you_mean('--' + name, options)}"
    key, equals, value = token.partition("=")
    option = "--" + key.replace("_", "-")
    if equals and "." not in key and option in options:
        return (f"{token!r} is not a recipe override (those are dotted keys such as "
                f"train.steps=5); for the option write {option} {value}")
    return None


# What a user meets that is not a bug: reported in one line, exit status 2.
USER_ERRORS = (ConfigError, CheckpointError, SourceError, TokenizerError, MetricsError,
               FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code: 2 for a bad recipe, checkpoint, input or
    arguments, 1 for any other failure (one line, the traceback saved to a file), 130 when
    interrupted."""
    args = parse_arguments(argv)
    name = args.parser.prog
    select_platforms()
    try:
        return args.run(args)
    except USER_ERRORS as err:
        print(f"{name}: error: {err}{_make_hint(err)}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        # A failed save leaves orbax threads waiting out their timeouts (minutes) before the
        # interpreter may exit; the error is reported and nothing else is pending.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    except OSError as err:  # disk full, permissions, a vanished mount: the message names it
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug: one line here, the traceback in a file
        if "RESOURCE_EXHAUSTED" in str(err):
            print(f"{name}: error: out of device memory ({first_line(err)}); use smaller "
                  f"microbatches (train.microbatch_size, train.max_microbatch_size) or more "
                  f"devices", file=sys.stderr)
            return 2
        saved = _save_traceback()
        print(f"{name}: internal error: {type(err).__name__}: {first_line(err)} (the "
              f"traceback is in {saved}; please report it)", file=sys.stderr)
        return 1


# The demo's inputs, as the Makefile names them: what to run when one is missing.
_DEMO_DIR = Path("runs", "demo")
_DEMO_DATA = ("data", "heldout", "tokenizer")


def _make_hint(err: BaseException) -> str:
    """For a missing input of the demo (a path under runs/demo), the make target that
    creates it; "" otherwise."""
    path = getattr(err, "path", None)
    if path is None or Path(path).parts[:2] != _DEMO_DIR.parts:
        return ""
    parts = Path(path).parts
    target = "make demo-data" if len(parts) > 2 and parts[2] in _DEMO_DATA else "make demo"
    return f" (for the demo, `{target}` creates it)"


def _save_traceback() -> str:
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w", prefix="ettin-jax-", suffix=".traceback.txt",
                                     delete=False) as file:
        traceback.print_exc(file=file)
    return file.name


if __name__ == "__main__":
    sys.exit(main())
