"""The machine's FID cache: keyed by content, shared by folders and processes, listed and cleared."""
from __future__ import annotations

import errno
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from common.atomic import disk_error_line
from eval import fid_cache
from eval.fid import Features
from eval.fid_cache import cache_entries, clear_cache, reference_features, reference_stats, source_fingerprint
from pipelines.sample import dataset_features
from study.cli import main
from tests.eval.test_fid import save, waves


@pytest.fixture
def fake_extractor(monkeypatch):
    """Replaces the network: features are a function of the images (a tensor or a generator), calls are counted."""
    calls = []

    def extract(source, num_images, **kw):
        calls.append(num_images)
        x = torch.cat(list(source())) if callable(source) else torch.as_tensor(source)
        return Features(x[:num_images].reshape(num_images, -1)[:, :8].double().numpy())
    monkeypatch.setattr(fid_cache, "extract_features", extract)
    return calls


def test_an_entry_is_computed_once_and_keyed_by_content(fake_extractor, tmp_path):
    x = waves(6, 0)
    s1 = reference_stats(x, "toy", 32, 5, tmp_path)
    s2 = reference_stats(x.clone(), "toy", 32, 5, tmp_path)
    assert fake_extractor == [5] and len(cache_entries(tmp_path)) == 1  # served from the cache
    np.testing.assert_array_equal(s1.sigma, s2.sigma)
    assert s2.num_images == 5
    x[0, 0, 0, 0] += 1  # one changed pixel: another key, another entry, without a warning
    s3 = reference_stats(x, "toy", 32, 5, tmp_path)
    assert fake_extractor == [5, 5] and not np.array_equal(s3.mu, s1.mu) and len(cache_entries(tmp_path)) == 2
    x[5] += 1  # the sixth image is not among the first five: the same entry
    reference_stats(x, "toy", 32, 5, tmp_path)
    reference_stats(x, "toy", 32, 4, tmp_path)  # another count, another entry
    reference_stats(x, "toy", 64, 4, tmp_path)  # another resolution, another entry
    assert fake_extractor == [5, 5, 4, 4]


def test_a_truncated_entry_is_named_and_recomputed(fake_extractor, tmp_path):
    x = waves(4, 0)
    reference_features(x, "toy", 32, 4, tmp_path)
    (entry,) = cache_entries(tmp_path)
    with open(entry["path"], "wb") as f:
        f.write(b"truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        again = reference_features(x, "toy", 32, 4, tmp_path)
    assert fake_extractor == [4, 4] and again.array.shape == (4, 8)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_kill_or_a_full_disk_while_writing_leaves_no_entry(fake_extractor, tmp_path, monkeypatch):
    def dies(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(fid_cache.np, "savez", dies)
    with pytest.raises(KeyboardInterrupt):
        reference_stats(waves(3, 0), "toy", 32, 3, tmp_path)
    assert cache_entries(tmp_path) == [] and not list(tmp_path.glob(".*.tmp"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fid_cache.np, "savez", full)
    with pytest.raises(OSError) as caught:
        reference_stats(waves(3, 0), "toy", 32, 3, tmp_path)
    line = disk_error_line(caught.value)
    assert "No space left on device writing" in line and ".npz" in line and "needed about" in line
    assert cache_entries(tmp_path) == [] and not list(tmp_path.glob(".*.tmp"))


def test_processes_sharing_the_cache_compute_each_entry_once(fake_extractor, tmp_path, monkeypatch):
    """Two sweeps asking for the same features at once: one computes, the other waits on the entry's lock and
    reads what the first wrote (without the lock both would see no file and compute)."""
    slow = fid_cache.extract_features

    def extract(source, num_images, **kw):
        time.sleep(0.5)  # long enough for the second caller to arrive while the first computes
        return slow(source, num_images, **kw)
    monkeypatch.setattr(fid_cache, "extract_features", extract)
    x, results = waves(6, 0), []
    callers = [threading.Thread(target=lambda: results.append(reference_stats(x, "toy", 32, 5, tmp_path)))
               for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert fake_extractor == [5] and len(results) == 2
    np.testing.assert_array_equal(results[0].sigma, results[1].sigma)


def test_folder_fingerprints_follow_content_not_file_times(tmp_path):
    folder = save(waves(3, 0), tmp_path / "imgs")
    fp = source_fingerprint(folder, 3)
    os.utime(os.path.join(folder, "000.png"), ns=(0, 0))
    assert source_fingerprint(folder, 3) == fp  # touched, not changed
    assert source_fingerprint(shutil.copytree(folder, tmp_path / "copy"), 3) == fp
    save(waves(3, 1), folder)
    assert source_fingerprint(folder, 3) != fp
    with pytest.raises(ValueError, match="fingerprint="):
        reference_stats(lambda: [waves(3, 0)], "gen", 32, 3, tmp_path)
    reference_stats(waves(3, 0), "../escape", 32, 3, tmp_path)  # a name is shown, never a path
    assert [os.path.dirname(e["path"]) for e in cache_entries(tmp_path)] == [str(tmp_path)]


def test_a_second_output_folder_and_a_copied_data_set_reuse_the_features(fake_extractor, tmp_path):
    """What the sweep and `vqgen gfid` ask for: a data set's training images as the tokenizer sees them."""
    data = save(waves(8, 0), tmp_path / "data")
    cache = tmp_path / "cache"
    first = dataset_features(data, 32, 3, 6, cache)
    again = dataset_features(str(shutil.copytree(data, tmp_path / "elsewhere")), 32, 3, 6, cache)
    assert fake_extractor == [6]
    np.testing.assert_array_equal(first.array, again.array)
    dataset_features(data, 32, 1, 6, cache)  # grey: other images, another entry
    dataset_features(data, 16, 3, 6, cache)  # another resolution
    assert fake_extractor == [6, 6, 6]
    save(waves(8, 1), tmp_path / "data")  # changed images invalidate the entry
    changed = dataset_features(data, 32, 3, 6, cache)
    assert fake_extractor == [6, 6, 6, 6] and not np.array_equal(changed.array, first.array)


def test_the_cache_lives_in_the_users_cache_folder_and_the_cli_lists_and_clears_it(fake_extractor, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.delenv("VQGEN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    reference_stats(waves(3, 0), "old", 32, 3)
    reference_stats(waves(3, 1), "new", 32, 3)
    where = tmp_path / "xdg" / "vqgen" / "fid"
    assert {e["name"] for e in cache_entries()} == {"old", "new"} and all(e["path"].startswith(str(where))
                                                                       for e in cache_entries())
    old = next(e["path"] for e in cache_entries() if e["name"] == "old")
    os.utime(old, (time.time() - 10 * 86400,) * 2)
    assert main(["cache"]) == 0
    listing = capsys.readouterr().out
    assert f"{where}: 2 entries" in listing and "old" in listing and "new" in listing
    assert main(["cache", "clear", "--older-than", "7"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert [e["name"] for e in cache_entries()] == ["new"]
    monkeypatch.setenv("VQGEN_CACHE", str(tmp_path / "own"))  # the override wins over XDG
    reference_stats(waves(3, 2), "own", 32, 3)
    assert [e["name"] for e in cache_entries()] == ["own"] and (tmp_path / "own" / "fid").is_dir()
    removed, busy = clear_cache(where)
    assert len(removed) == 1 and busy == [] and cache_entries(where) == []
