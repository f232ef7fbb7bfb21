"""`t2i` command line: train | compile | sample | eval | reconstruct | ablate | metrics | data.

  t2i train --config experiments/diffusion_shapes.py:demo --workdir runs/demo \
      [--config.KEY=VALUE ...]
  t2i compile --config experiments/ldm_shapes.py:full [--config.KEY=VALUE ...]
  t2i sample --workdir runs/demo --prompt "a red circle" [--prompt ...] --num 4 --seed 0 \
      [the family's sample options: --guidance 3 --steps 50 ...] --out samples.png
  t2i eval --workdir runs/demo [--num 256] [--seed 0]
  t2i reconstruct --workdir runs/vae --split validation --num 16 --out recon.png \
      [--lpips-backbone alexnet-owt-7be5be79.pth]
  t2i metrics fid DIR_A DIR_B [--inception-weights FILE] [--batch-size 50]
  t2i metrics kid DIR_REAL DIR_FAKE [--inception-weights FILE] [--subsets 100] \
      [--subset-size 1000] [--seed 0]
  t2i metrics is DIR [--inception-weights FILE] [--splits 10] [--seed 0]
  t2i metrics pr DIR_REAL DIR_FAKE [--inception-weights FILE] [--k 3]
  t2i metrics psnr|ssim|ms_ssim A B [--data-range 255]
  t2i metrics lpips A B --backbone-weights FILE [--net alex|vgg|squeeze]
  t2i data prepare t2i_shapes [--data-dir data] [--variant default] [--vocab-size 128]
  t2i data evaluators t2i_shapes [--data-dir data] [--variant default] [--seed 0]

Bad input (unknown config key, wrong type, missing workdir or file, corrupt checkpoint)
prints one line, `t2i: error: ...`, and exits with status 2. A run stopped by SIGTERM or
SIGINT saves a checkpoint and exits with status 75 (EX_TEMPFAIL: run the same command again).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from t2i_jax.errors import NonFiniteError, UserError

EXIT_USAGE = 2
EXIT_PREEMPTED = 75
EXIT_NONFINITE = 3  # updates stayed NaN/Inf after a rollback (train/nonfinite.py)


def _seed_list(text: str) -> tuple[int, ...]:
    """ "0,1,2" -> (0, 1, 2): distinct integers, at least one."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        msg = f"not a comma-separated list of integers: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated: {text!r}")
    return seeds


def _name_list(text: str) -> tuple[str, ...]:
    """ "bert,bow" -> ("bert", "bow"): at least one name."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"no entry names in {text!r}")
    return names


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.KEY=VALUE` / `--config.KEY VALUE` from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i", description="t2i_jax: text-to-image in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a run")
    train.add_argument("--config", required=True, help="experiment file.py[:variant]")
    train.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    multi = train.add_argument_group(
        "multi-process (one process per host; automatic under SLURM and on TPU pods)"
    )
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed.initialize() with its own cluster detection (e.g. Open MPI)",
    )
    multi.add_argument("--coordinator", help="process 0's HOST:PORT, for any other launcher")
    multi.add_argument("--num-processes", type=int, help="with --coordinator")
    multi.add_argument("--process-id", type=int, help="with --coordinator: 0 .. N-1")
    multi.add_argument(
        "--heartbeat-timeout",
        type=int,
        help="seconds after which a silent peer counts as dead and the others exit (default 60)",
    )

    compile_ = sub.add_parser(
        "compile",
        help="compile a config's train step without data or weights; print its memory",
        description="Lowers and compiles the train step for abstract inputs on this "
        "machine's devices (train/preflight.py) and prints the parameters, the state and "
        "XLA's peak memory per device, and the FLOPs per step. The text encoder is fitted "
        "to the built-in t2i_shapes captions; latent diffusion reads only its "
        "autoencoder run's config.json.",
    )
    compile_.add_argument("--config", required=True, help="experiment file.py[:variant]")
    compile_.add_argument(
        "--devices",
        type=int,
        help="compile for the first N devices here (default: all); the mesh spans them",
    )
    compile_.add_argument(
        "--json", dest="json_out", metavar="FILE", help="also write the figures as JSON"
    )

    sample = sub.add_parser(
        "sample",
        help="sample a grid of images from a run",
        add_help=False,  # -h with --workdir also lists the run's family's sample options
        epilog="Each family adds its own sample options (diffusion: --guidance --steps "
        "--sampler --eta; gan: --truncation --z-truncation --standing-stats; vae: --temperature; "
        "vqvae: --temperature "
        "--top-k --top-p --guidance): `t2i sample --workdir DIR -h` lists the run's.",
    )
    sample.add_argument("-h", "--help", action="store_true", help="show this help")
    sample.add_argument("--workdir")
    sample.add_argument("--prompt", action="append", help="repeatable")
    sample.add_argument("--num", type=int, default=4, help="images per prompt")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", help="output PNG")
    sample.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16"),
        help="the networks' compute dtype (default: the run's train.compute_dtype)",
    )
    parser.sample_parser = sample

    evaluate = sub.add_parser(
        "eval", help="sample a run's validation (and compositional) captions and score them"
    )
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument("--num", type=int, default=256, help="captions per split")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument(
        "--inception-weights",
        help="pytorch-fid's Inception file for FID, KID, IS and precision/recall (default: "
        "torch's hub cache; without it those are skipped)",
    )
    evaluate.add_argument(
        "--no-inception", action="store_true", help="skip FID, KID, IS, precision/recall"
    )
    evaluate.add_argument(
        "--out-dir",
        help="write metrics.json and the grids here (default: WORKDIR/eval, whose numbers "
        "the run's report shows); the family's sample options (`t2i sample --workdir W "
        "--help`), e.g. --sampler heun --steps 10, override the run's",
    )

    reconstruct = sub.add_parser(
        "reconstruct", help="originals next to a VAE-family run's reconstructions, PSNR/SSIM"
    )
    reconstruct.add_argument("--workdir", required=True)
    reconstruct.add_argument("--split", default="validation")
    reconstruct.add_argument("--num", type=int, default=16, help="first N examples")
    reconstruct.add_argument("--out", required=True, help="output PNG (numbers: same name .json)")
    reconstruct.add_argument(
        "--lpips-backbone",
        help="torchvision state dict of the LPIPS backbone (e.g. alexnet-owt-7be5be79.pth): "
        "adds LPIPS under each pair",
    )
    reconstruct.add_argument("--lpips-net", choices=("alex", "vgg", "squeeze"), default="alex")

    ablate = sub.add_parser(
        "ablate", help="train (and evaluate) every run of a sweep; write one results table"
    )
    ablate.add_argument("--sweep", required=True, help="sweep file.py[:arg] with get_sweep(arg)")
    ablate.add_argument("--workdir", required=True, help="one run directory per sweep run")
    ablate.add_argument("--eval", action="store_true", help="`t2i eval` every run")
    ablate.add_argument("--num", type=int, default=256, help="eval captions per split")
    ablate.add_argument("--seed", type=int, default=0, help="eval seed")
    ablate.add_argument(
        "--seeds",
        type=_seed_list,
        help="train every entry once per seed, e.g. 0,1,2: metrics as mean ± std",
    )
    ablate.add_argument(
        "--runs",
        type=_name_list,
        help="only these entries, e.g. bert,bow (the results cover them; the rest keep "
        "their directories)",
    )
    ablate.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    metrics = sub.add_parser(
        "metrics", help="compare two image folders (or two images); IS scores one folder"
    )
    metrics_sub = metrics.add_subparsers(dest="metric", required=True)

    def inception_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--inception-weights",
            help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a .safetensors "
            "conversion (default: torch's hub cache)",
        )
        command.add_argument("--batch-size", type=int, default=50)

    fid = metrics_sub.add_parser("fid", help="FID as pytorch-fid (folders or .npz statistics)")
    fid.add_argument("path_a")
    fid.add_argument("path_b")
    inception_options(fid)
    fid.add_argument("--json", help="also write the result, with sample counts and hashes")
    kid = metrics_sub.add_parser(
        "kid", help="KID as torchmetrics, on the FID Inception's pool3 features"
    )
    kid.add_argument("path_a", help="the real images (drawn first in each subset)")
    kid.add_argument("path_b", help="the generated images")
    inception_options(kid)
    kid.add_argument("--subsets", type=int, default=100)
    kid.add_argument(
        "--subset-size", type=int, default=1000, help="capped at the smaller folder's count"
    )
    kid.add_argument("--seed", type=int, default=0, help="of the subsets' draws")
    kid.add_argument("--json", help="also write the result, with counts and options")
    inception_score = metrics_sub.add_parser(
        "is", help="Inception Score as torchmetrics, on the FID Inception's logits"
    )
    inception_score.add_argument("path")
    inception_options(inception_score)
    inception_score.add_argument("--splits", type=int, default=10)
    inception_score.add_argument("--seed", type=int, default=0, help="of the shuffle")
    inception_score.add_argument("--json", help="also write the result, with counts and options")
    pr = metrics_sub.add_parser(
        "pr", help="improved precision and recall, on the FID Inception's pool3 features"
    )
    pr.add_argument("path_real")
    pr.add_argument("path_fake")
    inception_options(pr)
    pr.add_argument("--k", type=int, default=3, help="nearest neighbour that sets each radius")
    pr.add_argument("--json", help="also write the result, with counts and options")
    for name in ("psnr", "ssim", "ms_ssim"):
        pixel = metrics_sub.add_parser(name, help=f"{name.upper()}, per image pair then mean")
        pixel.add_argument("path_a")
        pixel.add_argument("path_b")
        pixel.add_argument("--data-range", type=float, default=255.0)
        pixel.add_argument("--json")
    lpips = metrics_sub.add_parser("lpips", help="LPIPS v0.1, per image pair then mean")
    lpips.add_argument("path_a")
    lpips.add_argument("path_b")
    lpips.add_argument("--net", choices=("alex", "vgg", "squeeze"), default="alex")
    lpips.add_argument(
        "--backbone-weights",
        help="torchvision state dict of the backbone (e.g. alexnet-owt-7be5be79.pth)",
    )
    lpips.add_argument("--batch-size", type=int, default=32)
    lpips.add_argument("--json")

    data = sub.add_parser("data", help="data set commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="build a data set and its tokenizer")
    prepare.add_argument("name")
    prepare.add_argument("--data-dir", default="data")
    prepare.add_argument("--variant", default="default")
    prepare.add_argument("--vocab-size", type=int, default=128)
    imp = data_sub.add_parser(
        "import",
        help="import captioned images (a folder, webdataset shards or COCO) as a data set",
    )
    imp.add_argument("src", help="folder | .tar shard, folder of shards or glob | COCO json")
    imp.add_argument("--name", required=True, help="the data set's name: --config.data.name")
    imp.add_argument("--format", required=True, choices=("folder", "webdataset", "coco"))
    imp.add_argument("--data-dir", default="data", help="written to DATA_DIR/NAME")
    imp.add_argument("--image-size", type=int, default=64)
    imp.add_argument("--crop", choices=("center", "random"), default="center")
    imp.add_argument("--min-size", type=int, default=16, help="skip smaller images (px)")
    imp.add_argument("--validation-fraction", type=float, default=0.05)
    imp.add_argument("--caption-column", help="folder metadata column (default: text|caption)")
    imp.add_argument("--image-dir", help="coco: the image folder (default: beside the json)")
    imp.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    imp.add_argument("--seed", type=int, default=0, help="validation split and random crops")
    imp.add_argument("--vocab-size", type=int, default=128, help="tokenizer trained after")
    imp.add_argument("--overwrite", action="store_true", help="replace DATA_DIR/NAME")
    imp.add_argument("--no-progress", action="store_true")
    evaluators = data_sub.add_parser(
        "evaluators",
        help="train the attribute probe and contrastive encoder that `t2i eval` scores with",
    )
    evaluators.add_argument("name")
    evaluators.add_argument("--data-dir", default="data")
    evaluators.add_argument("--variant", default="default")
    evaluators.add_argument("--seed", type=int, default=0)
    return parser


def _train(args, overrides: list[str]) -> int:
    from t2i_jax import config as config_lib
    from t2i_jax import sharding
    from t2i_jax.eval.training_probe import make_training_probe
    from t2i_jax.train import multihost
    from t2i_jax.train.loop import Preempted, train_and_evaluate

    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    multihost.split_cpu(sharding.mesh_config(config).cpu_devices)  # before anything runs JAX
    config_lib.validate(config)
    multihost.initialize(
        distributed=args.distributed,
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        heartbeat_timeout=args.heartbeat_timeout or multihost.DEFAULT_HEARTBEAT_TIMEOUT,
    )
    try:
        train_and_evaluate(
            config, args.workdir, show_progress=not args.no_progress, probe=make_training_probe
        )
    except Preempted as e:
        print(f"t2i: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    print(f"report: {args.workdir.rstrip('/')}/report.md")
    return 0


def _compile(args, overrides: list[str]) -> int:
    import dataclasses
    import tempfile

    import jax

    from t2i_jax import config as config_lib
    from t2i_jax.train import preflight

    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    devices = jax.devices()
    if args.devices is not None:
        if not 1 <= args.devices <= len(devices):
            raise UserError(f"--devices {args.devices}: this machine has {len(devices)}")
        devices = devices[: args.devices]
    with tempfile.TemporaryDirectory() as workdir:
        text = preflight.stand_in_text(config, workdir)
        step = preflight.compile_train_step(config, text, devices)
    print(f"{args.config} {' '.join(overrides)}".rstrip() + f": {step.summary()}")
    _write_json(args.json_out, {**dataclasses.asdict(step), "peak_bytes": step.peak_bytes})
    return 0


def _sample_options_parser(method_name: str, options) -> argparse.ArgumentParser:
    """The flags of a family's declared sample options (methods/base.py SampleOption)."""
    parser = argparse.ArgumentParser(prog=f"t2i sample ({method_name} run)", add_help=False)
    for option in options:
        parser.add_argument(
            option.flag,
            dest=option.name,
            type=option.type,
            choices=option.choices,
            default=None,
            help=f"{option.help} (default: the run's {option.config_key})",
        )
    return parser


def _family_options(method_name: str, options, extra: list[str]) -> dict:
    """The values of a family's sample flags in `extra` ({name: value}, unset ones left
    out); a flag the family does not declare is an error."""
    known, unknown = _sample_options_parser(method_name, options).parse_known_args(extra)
    if unknown:
        flags = " ".join(o.flag for o in options) or "none"
        raise UserError(
            f"{unknown[0]} does not apply to a {method_name} run; its sample options: {flags}"
        )
    return {k: v for k, v in vars(known).items() if v is not None}


def _sample(args, parser: argparse.ArgumentParser, extra: list[str]) -> int:
    from t2i_jax.methods.registry import method_class
    from t2i_jax.runs.loading import read_config

    if args.help and not args.workdir:
        parser.print_help()
        return 0
    if not args.workdir:
        raise UserError("t2i sample needs --workdir")
    config = read_config(args.workdir)
    options = method_class(config.method).sample_options
    options_parser = _sample_options_parser(config.method, options)
    if args.help:
        options_parser.print_help()
        return 0
    if not args.prompt or not args.out:
        raise UserError("t2i sample needs --prompt (repeatable) and --out")
    known = _family_options(config.method, options, extra)
    if args.num < 1:
        raise UserError(f"--num must be at least 1, got {args.num}")
    from t2i_jax.text.prompts import check_prompts

    check_prompts(args.prompt)  # before the run is read; its tokenizer's check follows

    from t2i_jax.grid import save_grid
    from t2i_jax.pipeline import Pipeline

    pipe = Pipeline.from_workdir(args.workdir, compute_dtype=args.compute_dtype)
    images = pipe(args.prompt, num=args.num, seed=args.seed, output="numpy", **known)
    save_grid(args.out, images, args.prompt)
    print(f"wrote {args.out}")
    return 0


def _reconstruct(args) -> int:
    from t2i_jax.eval.reconstruct import write_reconstructions

    summary = write_reconstructions(
        args.workdir,
        split=args.split,
        num=args.num,
        out=args.out,
        lpips_backbone=args.lpips_backbone,
        lpips_net=args.lpips_net,
    )
    lpips_mean = summary.get(f"lpips_{args.lpips_net}_mean")
    lpips_part = "" if lpips_mean is None else f", LPIPS-{args.lpips_net} {lpips_mean:.4f}"
    print(
        f"wrote {args.out}: {summary['num']} {summary['split']} pairs, "
        f"PSNR {float(summary['psnr_mean']):.2f} dB, SSIM {summary['ssim_mean']:.4f}"
        f"{lpips_part} (means)"
    )
    return 0


def _write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    # JSON has no inf (PSNR of identical images): write it as the string "inf".
    result = {
        k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in result.items()
    }
    try:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def _at_least(option: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UserError(f"{option} must be at least {minimum}, got {value}")


def _inception_metric(args) -> dict:
    """`t2i metrics kid | is | pr`: the FID Inception's outputs of each folder, then the metric."""
    from t2i_jax.errors import MetricError
    from t2i_jax.metrics import fid, image_io

    _at_least("--batch-size", args.batch_size, 1)
    if args.metric == "kid":
        _at_least("--subsets", args.subsets, 1)
        _at_least("--subset-size", args.subset_size, 2)
        paths, least = (args.path_a, args.path_b), 2
        needs = "KID needs at least 2 images on each side"
    elif args.metric == "is":
        _at_least("--splits", args.splits, 1)
        paths, least = (args.path,), args.splits
        needs = f"IS with --splits {args.splits} needs at least {least} images"
    else:
        _at_least("--k", args.k, 1)
        paths, least = (args.path_real, args.path_fake), args.k + 1
        needs = f"precision/recall with --k {args.k} needs at least {least} images on each side"
    # Counts first, so that a folder too small fails before any image goes through Inception.
    for path in paths:
        count = len(image_io.list_images(path))
        if count < least:
            raise MetricError(f"{needs}; {path} has {count}")
    inception = fid.load_fid_inception(args.inception_weights)
    outputs = [
        fid.inception_outputs_of_path(path, inception, batch_size=args.batch_size) for path in paths
    ]
    if args.metric == "kid":
        from t2i_jax.metrics.kid import kernel_inception_distance

        (real, _), (fake, _) = outputs
        mean, std = kernel_inception_distance(
            real, fake, seed=args.seed, subsets=args.subsets, subset_size=args.subset_size
        )
        size = min(args.subset_size, len(real), len(fake))
        capped = (
            f", --subset-size {args.subset_size} capped at the smaller folder's count"
            if size < args.subset_size
            else ""
        )
        print(
            f"KID: {mean:.6g} (std {std:.3g})  ({len(real)} vs {len(fake)} images; "
            f"{args.subsets} subsets of {size}{capped}; seed {args.seed})"
        )
        return {
            "metric": "kid",
            "value": mean,
            "std": std,
            "count_a": len(real),
            "count_b": len(fake),
            "subsets": args.subsets,
            "subset_size": size,
            "subset_size_requested": args.subset_size,
            "seed": args.seed,
            "weights": inception.weights,
            "path_a": args.path_a,
            "path_b": args.path_b,
        }
    if args.metric == "is":
        import warnings

        from t2i_jax.metrics.inception_score import inception_score

        ((_, logits),) = outputs
        count = len(logits)
        chunks = math.ceil(count / math.ceil(count / args.splits))  # as torch.chunk cuts
        if chunks == 1:  # --splits 1: no spread to measure (numpy warns and gives nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = inception_score(logits, seed=args.seed, splits=1)[0], None
        else:
            mean, std = inception_score(logits, seed=args.seed, splits=args.splits)
        made = f" ({chunks} made, as torch.chunk cuts {count})" if chunks != args.splits else ""
        print(
            f"IS: {mean:.6f} ({'one split, no std' if std is None else f'std {std:.3g}'})  "
            f"({count} images; {args.splits} splits{made}; seed {args.seed})"
        )
        return {
            "metric": "is",
            "value": mean,
            "std": std,
            "count": count,
            "splits": args.splits,
            "splits_made": chunks,
            "seed": args.seed,
            "weights": inception.weights,
            "path": args.path,
        }
    from t2i_jax.metrics.precision_recall import precision_recall

    (real, _), (fake, _) = outputs
    precision, recall = precision_recall(real, fake, k=args.k)
    print(
        f"precision: {precision:.6f}  recall: {recall:.6f}  "
        f"({len(real)} real vs {len(fake)} generated images; k {args.k})"
    )
    return {
        "metric": "pr",
        "precision": precision,
        "recall": recall,
        "count_real": len(real),
        "count_fake": len(fake),
        "k": args.k,
        "weights": inception.weights,
        "path_real": args.path_real,
        "path_fake": args.path_fake,
    }


def _metrics(args) -> int:
    if args.metric in ("kid", "is", "pr"):
        result = _inception_metric(args)
    elif args.metric == "fid":
        from t2i_jax.metrics.fid import fid_of_paths

        result = fid_of_paths(
            args.path_a,
            args.path_b,
            inception_weights=args.inception_weights,
            batch_size=args.batch_size,
        ).to_dict()
        print(
            f"FID: {result['value']:.6f}  ({result['count_a']} vs {result['count_b']} images; "
            f"statistics {result['digest_a']} vs {result['digest_b']})"
        )
    else:
        if args.metric == "lpips":
            from t2i_jax.metrics.lpips import compare_images

            result = compare_images(
                args.path_a,
                args.path_b,
                net=args.net,
                backbone_weights=args.backbone_weights,
                batch_size=args.batch_size,
            )
        else:
            from t2i_jax.metrics.pixel import compare_images

            result = compare_images(
                args.metric, args.path_a, args.path_b, data_range=args.data_range
            )
        print(f"{result['metric'].upper()}: {result['value']:.6f}  ({result['count']} pairs)")
    _write_json(args.json, result)
    return 0


def _eval(args, extra: list[str]) -> int:
    from t2i_jax.eval.evaluate import evaluate_run
    from t2i_jax.methods.registry import method_class
    from t2i_jax.runs.loading import read_config

    if args.num < 1:
        raise UserError(f"--num must be at least 1, got {args.num}")
    options = {}
    if extra:  # the family's sample flags, as `t2i sample` takes them
        config = read_config(args.workdir)
        options = _family_options(config.method, method_class(config.method).sample_options,
                                  extra)  # fmt: skip
    out_dir = args.out_dir or os.path.join(args.workdir, "eval")
    evaluate_run(
        args.workdir,
        num=args.num,
        seed=args.seed,
        batch_size=args.batch_size,
        inception_weights=args.inception_weights,
        use_inception=not args.no_inception,
        sample_options=options,
        out_dir=out_dir,
    )
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}")
    return 0


def _ablate(args, overrides: list[str]) -> int:
    from t2i_jax.eval.ablate import run_sweep
    from t2i_jax.train.loop import Preempted

    if args.eval and args.num < 2:
        raise UserError(f"--num must be at least 2, got {args.num}")
    try:
        run_sweep(
            args.sweep,
            args.workdir,
            overrides,
            evaluate=args.eval,
            num=args.num,
            seed=args.seed,
            seeds=args.seeds,
            only=args.runs,
            show_progress=not args.no_progress,
        )
    except Preempted as e:
        print(f"t2i: {e}; run the same command to continue the sweep", file=sys.stderr)
        return EXIT_PREEMPTED
    print(f"results: {os.path.join(args.workdir, 'results.md')}")
    return 0


def _data(args) -> int:
    from t2i_jax.data import sources
    from t2i_jax.text.tokenizer import prepare_tokenizer

    if args.data_command == "import":
        from t2i_jax.data.importer import ImportOptions, import_data_set

        import_data_set(
            args.src,
            name=args.name,
            fmt=args.format,
            data_dir=args.data_dir,
            options=ImportOptions(
                image_size=args.image_size,
                crop=args.crop,
                min_size=args.min_size,
                validation_fraction=args.validation_fraction,
                seed=args.seed,
            ),
            caption_column=args.caption_column,
            image_dir=args.image_dir,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        builder = sources.load_builder(args.name, args.data_dir, "default")
        tokenizer = prepare_tokenizer(builder, args.vocab_size)
        print(f"tokenizer: vocab {tokenizer.vocab_size}, trained on the training captions")
        return 0
    if args.data_command == "evaluators":
        from t2i_jax.eval.evaluators import train_evaluators

        train_evaluators(args.name, args.data_dir, args.variant, seed=args.seed)
        return 0
    builder = sources.prepare(args.name, args.data_dir, args.variant)
    tokenizer = prepare_tokenizer(builder, args.vocab_size)
    splits = ", ".join(f"{k} {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
    print(
        f"{args.name} ({args.variant}) in {builder.data_dir}: {splits}; "
        f"tokenizer vocab {tokenizer.vocab_size}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Libraries log routine notices as warnings (orbax's read-only mode, TFDS metadata);
    # errors still show, and ours come as one `t2i: error:` line.
    for noisy in ("absl", "orbax", "jax", "tensorflow_datasets", "grain"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = _split_config_overrides(argv)
        parser = _parser()
        args, extra = parser.parse_known_args(rest)
        if extra and args.command not in ("sample", "eval"):  # a family's own flags
            parser.parse_args(rest)
        if overrides and args.command not in ("train", "compile", "ablate"):
            raise UserError(
                "--config.* overrides apply to `t2i train`, `t2i compile` and `t2i ablate` "
                f"only: {overrides[0]}"
            )
        if args.command == "train":
            return _train(args, overrides)
        if args.command == "compile":
            return _compile(args, overrides)
        if args.command == "sample":
            return _sample(args, parser.sample_parser, extra)
        if args.command == "eval":
            return _eval(args, extra)
        if args.command == "ablate":
            return _ablate(args, overrides)
        if args.command == "reconstruct":
            return _reconstruct(args)
        if args.command == "metrics":
            return _metrics(args)
        return _data(args)
    except UserError as e:
        print(f"t2i: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteError as e:  # `t2i train`, `t2i ablate`
        print(f"t2i: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except OSError as e:  # a read or write the code did not name itself: still one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"t2i: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
