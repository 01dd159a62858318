"""Toy drift demos (Beyond Stationarity, Suppl. 11): the two online rules and the streams, formula by formula."""
import json

import pytest
import torch

from study.toy.drift import DriftConfig, Scenario, ema_online_step, ns_vq_online_step, run_drift_demo, run_method


def test_ema_online_step_moves_assigned_codes_to_their_batch_means():
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[1.0, 1.0], [-1.0, 3.0], [9.0, 1.0]])  # two points to code 0, one to code 1, none to 2
    out = ema_online_step(codes, x, alpha=0.3)
    assert torch.allclose(out[0], 0.7 * codes[0] + 0.3 * torch.tensor([0.0, 2.0]))
    assert torch.allclose(out[1], 0.7 * codes[1] + 0.3 * x[2])
    assert torch.equal(out[2], codes[2])


def test_ns_vq_online_step_matches_the_rule_written_out():
    torch.manual_seed(0)
    codes, x, tau, lr = torch.randn(5, 2), torch.randn(3, 2) * 2, 0.7, 0.2
    expected = [[float(v) for v in row] for row in codes]
    for xi in x.tolist():
        dists = [(xi[0] - c[0]) ** 2 + (xi[1] - c[1]) ** 2 for c in expected]
        w = dists.index(min(dists))
        d = [(c[0] - expected[w][0]) ** 2 + (c[1] - expected[w][1]) ** 2 for c in expected]
        e = [torch.exp(torch.tensor(-dk / tau)).item() for dk in d]
        omega = [v / sum(e) for v in e]
        new = []
        for k, c in enumerate(expected):
            rate = lr if k == w else lr * omega[k]
            new.append([c[0] + rate * (xi[0] - c[0]), c[1] + rate * (xi[1] - c[1])])
        expected = new
    torch.testing.assert_close(ns_vq_online_step(codes, x, tau, lr), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_streams_follow_the_drift_updates():
    cfg = DriftConfig(batch_size=100)
    t = Scenario("translation", cfg)
    first = t.batch(0)
    torch.testing.assert_close(t.theta, torch.tensor([1.0, 1.0]))  # theta = 0 + 0.1 * mean((x + 10) - x)
    assert torch.allclose(t.batch(1).mean(0) - first.mean(0), torch.tensor([1.0, 1.0]), atol=0.5)
    e = Scenario("expansion", cfg)
    xb = e.batch(0)
    remaining = set(e.order)  # the epoch's permutation minus the 100 indices the batch took
    x = e.x[torch.tensor([i for i in range(1500) if i not in remaining])]
    assert xb.shape == (100, 2) and len(x) == 100
    m = torch.tensor([[2.5, 0.5], [0.0, 2.0]])
    expected = torch.eye(2) + 0.1 * (2 / 100) * (x @ m.T - x).T @ x  # A = I + r (2/B) E^T X_b, E = Y_b - I X_b
    torch.testing.assert_close(e.a, expected, rtol=1e-5, atol=1e-5)
    s = Scenario("split", cfg)
    s.batch(0)
    assert (s.theta > 0).all()
    cloud = s.cloud()
    assert torch.equal(cloud, s.x + torch.sign(s.x) * s.theta)


def test_drift_demo_writes_tables_and_frames(tmp_path):
    cfg = DriftConfig(scenarios=["translation"], methods=["ema-online", "ns-vq-online", "vq"], epochs=2)
    summary = run_drift_demo(cfg, tmp_path)
    assert set(summary["translation"]) == {"ema-online", "ns-vq-online", "vq"}
    assert (tmp_path / "frames_translation.png").exists()
    assert "| ns-vq-online |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["config"]["epochs"] == 2
    with pytest.raises(ValueError, match="unknown scenario/method"):
        DriftConfig(scenarios=["rotation-of-doom"])


def test_ns_vq_online_keeps_more_codes_alive_than_ema_under_translation():
    """The paper's Suppl. 11.1 claim, on our stream: NS-VQ's kernel drags unselected codes along."""
    cfg = DriftConfig(scenarios=["translation"])
    ema = run_method("ema-online", "translation", cfg)["final"]
    ns = run_method("ns-vq-online", "translation", cfg)["final"]
    assert ns["usage"] > ema["usage"] and ns["distortion"] < ema["distortion"]
