"""Alignment during training: the evaluators read samples of the EMA parameters, so a run
logs how well it follows captions against steps and wall-clock minutes.

With `train.probe_num = N` (0: off), every `train.eval_every` steps and at the end the loop
samples the first N validation captions with `train.probe_sample_steps` sampler steps
(where the family has a `steps` option; the rest of the sampling as the run's config), with
`t2i eval`'s key, and logs what `t2i eval` measures of them: the probe's attribute accuracies
(`probe_color`, ..., `probe_caption`; t2i_shapes) and R-precision (`probe_r_precision`).
The numbers depend on the parameters alone, so a resumed run logs what an uninterrupted
one does. Cheap by design (few captions, few steps), so below `t2i eval`'s figures; the
report plots them against the run's minutes (train/report.py).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections

from t2i_jax import rng
from t2i_jax.errors import ConfigError
from t2i_jax.methods.base import Frozen, Method
from t2i_jax.text.tokenizer import CaptionTokenizer
from t2i_jax.train.report import PROBE_PREFIX  # what the report plots

SPLIT = "validation"
BATCH = 64  # captions per sampler call (`t2i eval`'s default)


def make_training_probe(
    method: Method,
    config: ml_collections.ConfigDict,
    builder,
    tokenizer: CaptionTokenizer,
    *,
    frozen: Frozen | None,
) -> Callable[[object], dict[str, float]] | None:
    """ema_params -> {"probe_<measure>": value}, or None when `train.probe_num` is 0.

    Everything but the sampling is done here, once: the evaluators (trained first, as by
    `t2i eval`, if the data set has none yet), the captions, their embeddings."""
    num = config.train.get("probe_num", 0)
    if not num:
        return None
    # Here, not above: `t2i train` without the probe does not load the evaluation stack.
    from t2i_jax.data.examples import load_examples
    from t2i_jax.eval.evaluate import SPLITS, features_of, generate, measure
    from t2i_jax.eval.evaluators import caption_ids, load_evaluators
    from t2i_jax.metrics import alignment
    from t2i_jax.runs.sampling import make_sampler

    if SPLIT not in builder.info.splits:
        raise ConfigError(f"train.probe_num: {config.data.name} has no {SPLIT} split")
    data = config.data
    evaluators = load_evaluators(data.name, data.dir, data.variant, train_if_missing=True)
    examples = load_examples(builder, SPLIT, min(num, len(builder.as_data_source(SPLIT))))
    names = {option.name for option in method.sample_options}
    options = {"steps": config.train.probe_sample_steps} if "steps" in names else {}
    sampler = make_sampler(method, **options)
    text_emb = evaluators.embed_texts(examples.captions)
    ids = caption_ids(data.name, examples)
    common = dict(
        text_emb=text_emb,
        text_ids=ids,
        reference=None,
        num_mismatched=min(99, alignment.max_mismatched(ids)),
        folds=min(10, len(examples.captions)),
        seed=0,
    )
    # `t2i eval`'s key for the validation split at the run's seed: the last step's probe is
    # what `t2i eval --num N --seed SEED --steps K --batch-size min(64, N)` reads there.
    key = jax.random.fold_in(rng.stream_key(config.seed, "eval"), SPLITS.index(SPLIT))

    def probe(params) -> dict[str, float]:
        images = generate(
            sampler,
            params,
            frozen,
            tokenizer,
            examples.captions,
            max_len=config.text.max_len,
            key=key,
            batch_size=min(BATCH, len(examples.captions)),
        )
        measured = measure(features_of(evaluators, images, None), examples, **common)
        out = {
            f"{PROBE_PREFIX}{k}": float(v)
            for k, v in measured.get("attribute_accuracy", {}).items()
        }
        out[f"{PROBE_PREFIX}r_precision"] = float(measured["r_precision"])
        return out

    return probe
