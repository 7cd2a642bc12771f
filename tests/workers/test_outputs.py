"""The dataset a job delivers, read back the way its users read it: WebDataset through the
`webdataset` library, RecordIO through an independent reader, the Parquet index through pyarrow;
the quality filter with top-up; the leakage check; the report; `idforge reproduce`."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from app import dataset_index
from app.settings import Settings
from app.spec import JobSpec
from models.seeding import make_generator
from tests.workers.test_formats import read_record, unpack
from workers.cli import main as cli
from workers.errors import QualityShortfall, ReferenceUnavailable
from workers.local import generate

SPEC: dict[str, Any] = {"identities": 5, "images_per_identity": 3, "seed": 5, "render": {"steps": 2, "batch_size": 4},
                        "output": {"formats": ["imagefolder", "webdataset", "recordio"]}}


def files_of(out: Path, m: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The job's kept images as its index lists them (the manifest lists none since version 3)."""
    return list(dataset_index.local_files(out, m))


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("job")
    m = generate(JobSpec.model_validate(SPEC), out, settings=Settings(model_dir=model_dir, shard_identities=2))
    return out, m


def test_webdataset_shards_read_back_with_the_library(job: tuple[Path, dict[str, Any]]) -> None:
    import webdataset as wds

    out, m = job
    by_key = {(f["identity"], f["sample"]): f for f in files_of(out, m)}
    # The tars are listed by the shard-objects table the manifest pins, not by the manifest itself.
    table = (out / "dataset" / "objects.jsonl").read_bytes()
    assert m["outputs"]["dataset/objects.jsonl"] == {"size": len(table), "sha256": hashlib.sha256(table).hexdigest(),
                                                     "rows": 3}
    assert not [rel for rel in m["outputs"] if rel.startswith("dataset/webdataset/")]
    rows = [json.loads(line) for line in table.splitlines()]
    assert [r["shard"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert hashlib.sha256((out / r["path"]).read_bytes()).hexdigest() == r["sha256"]
    urls = [str(out / r["path"]) for r in rows]
    assert len(urls) == 3  # shards of 2, 2 and 1 identities
    seen = set()
    for url in sorted(urls):
        for sample in wds.WebDataset(url, shardshuffle=False):
            meta = json.loads(sample["json"])
            i, s = meta["identity"], meta["sample"]
            f = by_key[(i, s)]
            assert sample["__key__"] == f"{i:06d}_{s:03d}" and int(sample["cls"]) == i
            assert sample["jpg"] == (out / f["path"]).read_bytes()  # the same bytes as the image folder
            assert meta["seed"] == f["seed"] and meta["centre_cosine"] == f["centre_cosine"]
            assert meta["reference_cosine"] == f["reference_cosine"]
            seen.add((i, s))
    assert seen == set(by_key) and len(seen) == 15


def test_recordio_reads_back_with_an_independent_reader(job: tuple[Path, dict[str, Any]]) -> None:
    out, m = job
    rec = (out / "dataset/recordio/train.rec").read_bytes()
    idx = [tuple(map(int, line.split("\t"))) for line in (out / "dataset/recordio/train.idx").read_text().splitlines()]
    offsets = dict(idx)
    flag, label, rid, _, _ = unpack(read_record(rec, offsets[0])[0])
    assert (flag, label, rid) == (2, [16.0, 21.0], 0)  # images are records 1..15, identities 16..20
    files = sorted(files_of(out, m), key=lambda f: (f["identity"], f["sample"]))
    for k, f in enumerate(files, start=1):
        flag, label, rid, id2, image = unpack(read_record(rec, offsets[k])[0])
        assert (flag, label, rid, id2) == (0, float(f["identity"]), k, f["sample"])
        assert image == (out / f["path"]).read_bytes()
    for i in range(5):
        _, label, rid, _, _ = unpack(read_record(rec, offsets[16 + i])[0])
        assert rid == 16 + i and label == [1.0 + 3 * i, 4.0 + 3 * i]
    lst = (out / "dataset/recordio/train.lst").read_text().splitlines()
    assert lst == [f"1\t{f['path']}\t{f['identity']}" for f in files]
    assert (out / "dataset/recordio/property").read_text() == "5,112,112"


def test_parquet_index_lists_every_image(job: tuple[Path, dict[str, Any]]) -> None:
    out, m = job
    table = pq.read_table(out / "dataset/index.parquet").to_pylist()
    assert len(table) == 15 and not any(r["filtered"] for r in table)
    by_path = {r["path"]: r for r in table}
    for f in files_of(out, m):
        r = by_path[f["path"]]
        assert (r["identity"], r["sample"], r["seed"], r["shard"], r["sha256"], r["aligned"]) == (
            f["identity"], f["sample"], f["seed"], f["shard"], f["sha256"], f["aligned"])
        assert r["centre_cosine"] == pytest.approx(f["centre_cosine"], abs=1e-6)
        assert r["evaluator_centre_cosine"] == pytest.approx(f["evaluator_centre_cosine"], abs=1e-6)
    assert all(isinstance(r["label_flip"], bool) for r in table)
    # Where else each image is: its tar member (and its data's offset) and its RecordIO record.
    tars = {}
    for r in table:
        assert r["member"] == f"{r['identity']:06d}_{r['sample']:03d}.jpg"
        tar = tars.setdefault(r["tar"], (out / r["tar"]).read_bytes())
        assert tar[r["tar_offset"]:r["tar_offset"] + r["size"]] == (out / r["path"]).read_bytes()
        assert dataset_index.read_record(dataset_index.file_reader(out / "dataset/recordio/train.rec")[0],
                                         r["record_offset"]) == (out / r["path"]).read_bytes()
    assert sorted(r["record_id"] for r in table) == list(range(1, 16))
    assert sum(r["label_flip"] for r in table) == m["quality"]["models"]["job"]["label_flips"]


def test_report_and_provenance(job: tuple[Path, dict[str, Any]]) -> None:
    out, m = job
    q = m["quality"]
    assert q["images"] == 15 and q["identities"] == 5
    assert q["models"]["job"]["name"] == "iresnet-tiny" and q["models"]["evaluator"]["name"].startswith("sface")
    assert q["models"]["job"]["genuine_pairs"] == 5 * 3 and q["models"]["job"]["impostor_pairs"] == 15 * 12 // 2
    report = json.loads((out / "report/report.json").read_bytes())
    assert report["summary"] == q
    html = (out / "report/report.html").read_text()
    assert "data:image/png;base64," in html and "iresnet-tiny" in html
    for name in ("scores_job", "scores_evaluator", "roc", "det", "contact_sheet"):
        assert Image.open(out / f"report/plots/{name}.png").size[0] > 100
    assert m["counts"] == {"requested": 15, "rendered": 15, "images": 15, "alignment_failures": 0, "filtered": 0,
                           "topped_up": 0, "unused_candidates": 0, "identities": 5, "images_per_identity": 3,
                           "shards": 3}
    assert set(m["timings_s"]) == {"sampling_identities", "rendering_shards_sum", "evaluating", "packaging"}
    assert m["plan"] == {"shard_identities": 2, "shards": 3}
    assert m["licenses"] and all(len(h) == 64 for h in m["models"]["generator"]["sha256"].values())
    assert m["spec_hash"] == JobSpec.model_validate(m["spec"]).spec_hash()


def _leave_one_out(features: torch.Tensor) -> torch.Tensor:
    """[n, A, E] -> [n, A]: each sample's cosine to its identity's centre without itself."""
    total = features.sum(dim=1, keepdim=True)  # [n, 1, E]
    centres = torch.nn.functional.normalize(total - features, dim=-1)  # [n, A, E]
    return (features * centres).sum(-1)


def test_quality_filter_tops_up_to_the_requested_counts(job: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                        model_dir: Path) -> None:
    out, _ = job
    sims = torch.cat([_leave_one_out(load_file(p)["job"]).flatten()
                      for p in sorted((out / "shards").glob("*/features.safetensors"))])
    threshold = round(float(sims.quantile(0.3)), 4)  # about a third of the first images fail
    spec = JobSpec.model_validate({**SPEC, "quality": {"min_identity_similarity": threshold, "max_topup_rounds": 10}})
    m = generate(spec, tmp_path / "f", settings=Settings(model_dir=model_dir, shard_identities=2))
    c = m["counts"]
    m_files = files_of(tmp_path / "f", m)
    assert c["images"] == 15 and c["filtered"] >= 4 and c["topped_up"] >= 4
    assert c["rendered"] == c["images"] + c["filtered"] + c["unused_candidates"]
    per_identity: dict[int, list[int]] = {}
    for f in m_files:
        per_identity.setdefault(f["identity"], []).append(f["sample"])
    assert all(len(v) == 3 for v in per_identity.values()) and max(max(v) for v in per_identity.values()) >= 3
    # The first images that were kept are the ones the unfiltered job made, byte for byte.
    first = {f["path"]: f["sha256"] for f in files_of(out)}
    kept_first = [f for f in m_files if f["sample"] < 3]
    assert kept_first and all(first[f["path"]] == f["sha256"] for f in kept_first)
    rows = pq.read_table(tmp_path / "f" / "dataset/index.parquet").to_pylist()
    dropped = [r for r in rows if r["filtered"]]
    assert len(dropped) == c["filtered"] and all(r["path"] is None and r["centre_cosine"] < threshold
                                                 for r in dropped)
    assert not (tmp_path / "f" / f"dataset/imagefolder/{dropped[0]['identity']:06d}/{dropped[0]['sample']:03d}.jpg").exists()


def test_quality_filter_fails_the_job_when_top_ups_run_out(tmp_path: Path, model_dir: Path) -> None:
    spec = JobSpec.model_validate({**SPEC, "identities": 2, "quality": {"min_identity_similarity": 0.99,
                                                                        "max_topup_rounds": 1}})
    with pytest.raises(QualityShortfall, match=r"identity 0 has \d of 3 images .* after 1 top-up rounds"):
        generate(spec, tmp_path / "f", settings=Settings(model_dir=model_dir))
    assert not (tmp_path / "f" / "manifest.json").exists()


def test_leakage_check_finds_a_planted_identity(job: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                model_dir: Path) -> None:
    out, _ = job
    centres = torch.cat([load_file(p)["centres"] for p in sorted((out / "shards").glob("*/features.safetensors"))])
    others = torch.nn.functional.normalize(make_generator(0).normal(40, centres.shape[1]),
                                           dim=1)
    models = tmp_path / "models"
    models.mkdir()
    for p in model_dir.iterdir():
        (models / p.name).symlink_to(p)
    (models / "reference_sets").mkdir()
    save_file({"embeddings": torch.cat([others[:20], centres[3:4], others[20:]])},
              str(models / "reference_sets" / "planted.safetensors"), metadata={"embedder": "iresnet-tiny"})
    spec = {**SPEC, "quality": {"leakage": {"reference": "planted", "threshold": 0.9}}}
    m = generate(JobSpec.model_validate(spec), tmp_path / "l", settings=Settings(model_dir=models, shard_identities=2))
    assert m["quality"]["leakage"]["identities"] == 1 and m["quality"]["leakage"]["max_cosine"] > 0.999
    assert m["reference_set"]["name"] == "planted" and len(m["reference_set"]["sha256"]) == 64
    top = json.loads((tmp_path / "l" / "report/report.json").read_bytes())["leakage"]["top_pairs"][0]
    assert (top["identity"], top["reference_row"]) == (3, 20)
    with pytest.raises(ReferenceUnavailable, match="no file"):
        generate(JobSpec.model_validate({**SPEC, "quality": {"leakage": {"reference": "absent"}}}), tmp_path / "x",
                 settings=Settings(model_dir=models))


def test_reproduce_is_byte_identical_and_refuses_other_weights(job: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                               model_dir: Path, monkeypatch: Any) -> None:
    out, m = job
    monkeypatch.setenv("IDFORGE_MODEL_DIR", str(model_dir))
    r = CliRunner().invoke(cli, ["reproduce", str(out / "manifest.json"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "images: 15/15 byte-identical; dataset objects: 7/7 byte-identical" in r.output
    assert "platform: the same as the job's" in r.output and r.output.splitlines()[-1] == "verdict: identical"
    # A manifest whose images differ from what these weights make, with no copy of the job's images
    # beside it to measure them against: named, and exit 1.
    files = files_of(out, m)
    tampered = {**m, "files": [{**files[0], "sha256": "0" * 64}, *files[1:]]}  # an old-format manifest
    (tmp_path / "t.json").write_text(json.dumps(tampered))
    r = CliRunner().invoke(cli, ["reproduce", str(tmp_path / "t.json"), "--out", str(tmp_path / "t")])
    assert r.exit_code == 1 and f"{files[0]['path']}: differs (no copy of the job's image" in r.output
    assert r.output.splitlines()[-1].startswith("verdict: differs (1 image(s) below cosine 0.95")
    # Other weights than the job's: refused before anything runs.
    other = {**m, "models": {**m["models"], "embedder": {**m["models"]["embedder"],
                                                         "sha256": {"model.pth": "1" * 64}}}}
    (tmp_path / "o.json").write_text(json.dumps(other))
    r = CliRunner().invoke(cli, ["reproduce", str(tmp_path / "o.json"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "local weights differ" in r.output and not (tmp_path / "o").exists()


def test_contact_sheet_shows_the_dataset_images(job: tuple[Path, dict[str, Any]]) -> None:
    out, m = job
    sheet = Image.open(out / "report/plots/contact_sheet.png")
    first = Image.open(io.BytesIO((out / files_of(out, m)[0]["path"]).read_bytes()))
    assert sheet.mode in ("RGB", "RGBA") and sheet.size[1] >= first.size[1] * 0.5


def test_index_rows_map_label_flips_through_each_identitys_kept_samples() -> None:
    from workers.outputs.index import index_rows

    def f(i: int, s: int) -> dict[str, Any]:
        return {"path": f"dataset/imagefolder/{i:06d}/{s:03d}.jpg", "identity": i, "sample": s, "seed": 1,
                "shard": 0, "size": 1, "sha256": "0" * 64, "aligned": True, "centre_cosine": 0.5}

    # Identity 1 kept samples 0, 2 and 5 (1, 3 and 4 were filtered or unused): slot 2 is sample 5.
    shard = {"files": [f(1, 5), f(0, 0), f(1, 0), f(0, 1), f(0, 2), f(1, 2)],
             "filtered": [{"identity": 1, "sample": 1, "seed": 2, "shard": 0, "aligned": True, "centre_cosine": 0.1}]}
    flips = torch.zeros(2, 3, dtype=torch.bool)
    flips[1, 2] = flips[0, 0] = True
    rows = index_rows(shard, flips)
    assert [(r["identity"], r["sample"], r["label_flip"], r["filtered"]) for r in rows] == [
        (0, 0, True, False), (0, 1, False, False), (0, 2, False, False),
        (1, 0, False, False), (1, 2, False, False), (1, 5, True, False), (1, 1, None, True)]
    assert rows[-1]["path"] is None and all(r["label_flip"] is None for r in index_rows(shard)[:6])


LATENT: dict[str, Any] = {"seed": 9, "models": {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"},
                          "sampler": {"method": "random"}, "variations": {"method": "dispersion", "iterations": 2},
                          "render": {"batch_size": 8}, "quality": {"report": False}}


def test_manifest_size_does_not_grow_with_the_images_or_the_shards_and_pins_the_index(
        tmp_path: Path, model_dir: Path) -> None:
    sizes = {}
    for ids, per_shard in ((2, 16), (16, 2)):  # 8 images in one shard, 64 in eight (a tar each)
        spec = JobSpec.model_validate({**LATENT, "identities": ids, "images_per_identity": 4})
        out = tmp_path / str(ids)
        m = generate(spec, out, settings=Settings(model_dir=model_dir, shard_identities=per_shard))
        raw = (out / "manifest.json").read_bytes()
        sizes[ids * 4] = len(raw)
        assert "files" not in m and "files" not in json.loads(raw)
        assert m["manifest_version"] == 3 and m["format"] == "idforge.manifest/3"
        index = (out / "dataset/index.parquet").read_bytes()
        assert m["index"]["sha256"] == hashlib.sha256(index).hexdigest() == m["outputs"]["dataset/index.parquet"]["sha256"]
        shards = ids // per_shard or 1
        assert m["index"]["size"] == len(index) and m["index"]["rows"] == ids * 4
        assert m["index"]["row_groups"] == shards == m["outputs"]["dataset/objects.jsonl"]["rows"]
        assert len(files_of(out, m)) == ids * 4
    # Only digits differ (identities 2 vs 16, images 8 vs 64, shards 1 vs 8, timings); inline files
    # grew 357 B an image, and the tars listed in the manifest about 100 B a shard.
    assert abs(sizes[64] - sizes[8]) < 64, sizes


@pytest.mark.parametrize("formats", [["webdataset"], ["recordio"]])
def test_a_job_without_loose_images_is_indexed_by_member_or_record(formats: list[str], tmp_path: Path,
                                                                    model_dir: Path, monkeypatch: Any) -> None:
    import hashlib

    spec = JobSpec.model_validate({**LATENT, "identities": 3, "images_per_identity": 2,
                                   "output": {"formats": formats}})
    out = tmp_path / "job"
    m = generate(spec, out, settings=Settings(model_dir=model_dir, shard_identities=2))
    assert not (out / "dataset/imagefolder").exists() and m["layout"]["imagefolder"] is None
    rows = files_of(out, m)
    assert [(r["identity"], r["sample"]) for r in rows] == [(i, s) for i in range(3) for s in range(2)]
    reader = dataset_index.local_reader(out)
    for r in rows:
        assert r["path"] is None
        if formats == ["webdataset"]:
            assert r["tar"] == f"dataset/webdataset/{r['shard']:06d}.tar"
            assert r["member"] == f"{r['identity']:06d}_{r['sample']:03d}.jpg" and r["record_id"] is None
        else:
            assert r["tar"] is None and r["record_id"] == 1 + r["identity"] * 2 + r["sample"]
            assert r["record_offset"] is not None
        assert hashlib.sha256(dataset_index.read_image(r, reader)).hexdigest() == r["sha256"]
    if formats == ["recordio"]:  # the .lst names a virtual path
        lst = (out / "dataset/recordio/train.lst").read_text().splitlines()
        assert lst[0] == "1\t000000/000.jpg\t0" and len(lst) == 6
    monkeypatch.setenv("IDFORGE_MODEL_DIR", str(model_dir))
    r = CliRunner().invoke(cli, ["reproduce", str(out), "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "images: 6/6 byte-identical" in r.output and r.output.splitlines()[-1] == "verdict: identical"
