"""eval-tokenizer on a trained run: reconstruction metrics, codebook health with its ceiling, the grid."""
import json
import math

import pytest

from stage1_tokenizer.evaluate import evaluate_tokenizer
from stage1_tokenizer.train import train_tokenizer
from tests.helpers import small_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vq"
    train_tokenizer(small_config("model.resolution=32", "train.max_steps=4", "train.checkpoint_every=100",
                                 "train.sample_every=4", "data.num_images=64"), out)  # 4 steps = 1 epoch
    return out


def test_eval_tokenizer_writes_metrics_and_grid(run):
    result = evaluate_tokenizer(run, num_images=24, batch_size=12)
    saved = json.loads((run / "eval.json").read_text())
    assert saved == result
    for key in ("rfid", "lpips_vgg", "lpips_alex", "ssim", "psnr", "usage", "perplexity", "d_per_bit"):
        assert isinstance(result[key], float), key
    assert result["rfid"] > 0 and 0 < result["lpips_vgg"] < 1.5 and -1 <= result["ssim"] <= 1 and result["psnr"] > 0
    assert result["num_images"] == 24 and sum(result["code_counts"]) == 24 * 16 * 16  # 16x16 tokens per image
    assert result["usage"] == pytest.approx(sum(c > 0 for c in result["code_counts"]) / 32)
    tokens = 24 * 16 * 16
    assert result["usage_tokens"] == tokens and result["usage_ceiling"] == pytest.approx(1 - math.exp(-tokens / 32))
    assert "usage_epoch" in result  # from training (None when the run never completed an epoch)
    assert (run / "eval_recon.png").exists()




def test_eval_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="not a finished tokenizer run"):
        evaluate_tokenizer(tmp_path)
