"""The VAE family through the real `t2i` entry point: train, sample, reconstruct."""

import json

import numpy as np
import pytest
from helpers import run_cli, sample_checked, train_args, untrained_vae_run
from PIL import Image
from safetensors.numpy import save_file

from t2i_jax.eval.reconstruct import reconstruct_split
from t2i_jax.metrics import lpips
from t2i_jax.nets import lpips_backbones


def test_vae_run_trains_samples_and_reconstructs(tmp_path, data_dir):
    workdir = tmp_path / "vae"
    args = train_args(workdir, data_dir, "--config.train.steps=3")
    args[2] = args[2].replace("diffusion_shapes.py", "vae_shapes.py")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]  # step 3: train metrics and validation (eval_every=3) in one row
    assert last["step"] == 3
    assert {"recon", "kl", "nelbo", "bits_per_dim", "kl_weight"} <= set(last)
    assert {"val_bits_per_dim", "val_nelbo", "val_active_units"} <= set(last)
    assert 0 < last["val_bits_per_dim"] < 16
    report = (workdir / "report.md").read_text()
    assert "val_bits_per_dim.png" in report

    out = tmp_path / "vae.png"
    args = ["--workdir", str(workdir), "--prompt", "a red circle", "--num", "2",
            "--temperature", "0.5"]  # fmt: skip
    # Same seed, same samples; another, others: test_vae.py, in-process.
    sample_checked(args, out, prompts=1, per_prompt=2, image_size=32, repeat=False)

    recon = tmp_path / "recon.png"
    backbone = tmp_path / "alex.safetensors"  # random weights: ImageNet's are not shipped
    alex = lpips_backbones.random_backbone_params("alex", seed=0)
    save_file(lpips_backbones.state_dict_from_params("alex", alex), str(backbone))
    made = run_cli("reconstruct", "--workdir", str(workdir), "--split", "validation", "--num",
                   "5", "--out", str(recon), "--lpips-backbone", str(backbone))  # fmt: skip
    assert made.returncode == 0, made.stderr
    summary = json.loads((tmp_path / "recon.json").read_text())
    assert len(summary["psnr"]) == len(summary["ssim"]) == len(summary["captions"]) == 5
    assert summary["psnr_mean"] == pytest.approx(np.mean(summary["psnr"]), rel=1e-12)
    assert f"PSNR {summary['psnr_mean']:.2f} dB" in made.stdout
    assert f"LPIPS-alex {summary['lpips_alex_mean']:.4f}" in made.stdout
    # The LPIPS written is that of the pairs shown: recompute it from the same reconstructions.
    pairs = reconstruct_split(str(workdir), split="validation", num=5)
    expected = lpips.lpips_distance(
        lpips.load_lpips("alex", str(backbone)),
        lpips.to_model_range(pairs["originals"]),
        lpips.to_model_range(pairs["reconstructions"]),
    )
    np.testing.assert_allclose(summary["lpips_alex"], np.asarray(expected), rtol=1e-5)
    assert min(summary["lpips_alex"]) > 0
    grid = np.asarray(Image.open(recon))
    assert grid.shape[1] > 2 * 32 * 4 * 4  # four pairs of two 4x-scaled images per row


def test_vqvae_run_trains_samples_with_its_prior_and_reconstructs(tmp_path, data_dir):
    workdir = tmp_path / "vqvae"
    args = train_args(workdir, data_dir, "--config.train.steps=3")
    args[2] = args[2].replace("diffusion_shapes.py", "vqvae_shapes.py")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"recon", "commitment", "prior_loss", "perplexity", "codes_used"} <= set(last)
    assert {"val_recon", "val_prior_loss", "val_perplexity", "val_codes_used"} <= set(last)
    out = tmp_path / "vq.png"
    args = ["--workdir", str(workdir), "--prompt", "a red circle", "--num", "2", "--temperature",
            "0.8", "--top-k", "4", "--top-p", "0.9", "--guidance", "2"]  # fmt: skip
    # Same seed, same samples; another, others: test_vqvae.py, in-process.
    sample_checked(args, out, prompts=1, per_prompt=2, image_size=32, repeat=False)
    recon = tmp_path / "recon.png"
    made = run_cli("reconstruct", "--workdir", str(workdir), "--num", "3", "--out", str(recon))
    assert made.returncode == 0, made.stderr
    assert len(json.loads((tmp_path / "recon.json").read_text())["psnr"]) == 3


def test_latent_diffusion_loads_its_frozen_vae(tmp_path, data_dir):
    import jax

    from t2i_jax.checkpoint import read_latest_arrays
    from t2i_jax.runs.loading import load_run

    vae = tmp_path / "vae"  # training it through the CLI: the VAE test above
    vae.mkdir()
    untrained_vae_run(data_dir, vae)

    # Without its VAE run it stops before anything is written: test_bad_input.py's table.
    ldm = tmp_path / "ldm"
    ldm_args = train_args(ldm, data_dir, "--config.train.steps=2")
    ldm_args[2] = ldm_args[2].replace("diffusion_shapes.py", "ldm_shapes.py")
    result = run_cli(*ldm_args, f"--config.ldm.autoencoder={vae}")
    assert result.returncode == 0, result.stderr
    frozen = jax.device_get(load_run(str(ldm)).frozen["autoencoder"])
    trained = jax.device_get(load_run(str(vae)).state.ema_params["model"])
    # Frozen weights are stored once in the run, never in its checkpoints (nor averaged).
    assert set(read_latest_arrays(str(ldm / "checkpoints"))["params"]["model"]) == {
        "text_encoder",
        "unet",
    }
    for part in ("encoder", "decoder"):  # the VAE run's EMA weights, bit for bit
        for a, b in zip(jax.tree.leaves(frozen[part]), jax.tree.leaves(trained[part]), strict=True):
            np.testing.assert_array_equal(a, b)

    args = ["--workdir", str(ldm), "--prompt", "a red circle", "--num", "2", "--steps", "3",
            "--guidance", "2"]  # fmt: skip
    sample_checked(args, tmp_path / "ldm.png", prompts=1, per_prompt=2, image_size=32)
    recon = run_cli("reconstruct", "--workdir", str(ldm), "--num", "2", "--out",
                    str(tmp_path / "r.png"))  # fmt: skip
    assert recon.returncode == 0, recon.stderr
