"""Where S3 values are recognised without any S3 call: config validation, cloud.toml, and job progress."""

from __future__ import annotations

from pathlib import Path

import pytest

from kohya_backend.config.validate import validate_config
from kohya_backend.errors import ConfigError, TrainManagementError
from kohya_backend.jobs.progress import summarize
from kohya_backend.jobs.s3_jobs import human_bytes, s3_inputs
from kohya_backend.storage.settings import load_cloud_settings
from kohya_backend.storage.uri import S3Uri


def test_config_accepts_s3_uris_where_a_job_downloads_or_uploads_them(tmp_path: Path) -> None:
    config = validate_config(
        {
            "pretrained_model_name_or_path": "s3://bkt/models/m.safetensors",
            "train_data_dir": "s3://bkt/datasets/cats",
            "network_weights": "s3://bkt/loras/start.safetensors",
            "sample_prompts": "s3://bkt/prompts.txt",
            "output_dir": "s3://bkt/out/",
        },
        "sd_1_5",
    )
    assert config.values["train_data_dir"] == "s3://bkt/datasets/cats"  # not checked on this disk
    assert s3_inputs(config.values) == {
        "pretrained_model_name_or_path": S3Uri("bkt", "models/m.safetensors"),
        "train_data_dir": S3Uri("bkt", "datasets/cats"),
        "network_weights": S3Uri("bkt", "loras/start.safetensors"),
        "sample_prompts": S3Uri("bkt", "prompts.txt"),
    }
    with pytest.raises(ConfigError) as caught:
        validate_config(
            {
                "pretrained_model_name_or_path": "s3://Bad_Bucket/m.safetensors",
                "train_data_dir": str(tmp_path),
                "output_dir": str(tmp_path),
                "tokenizer_cache_dir": "s3://bkt/tok",
            },
            "sd_1_5",
        )
    keys = {issue.key: issue.message for issue in caught.value.issues}
    assert "bucket name" in keys["pretrained_model_name_or_path"]
    assert "cannot be an s3:// URI" in keys["tokenizer_cache_dir"]
    with pytest.raises(ConfigError) as local:  # a local path that does not exist is still refused
        validate_config({"pretrained_model_name_or_path": str(tmp_path / "nope.safetensors"),
                         "train_data_dir": "s3://bkt/d", "output_dir": str(tmp_path)}, "sd_1_5")  # fmt: skip
    assert [i.key for i in local.value.issues] == ["pretrained_model_name_or_path"]


def test_cloud_toml_names_the_prefix_unless_a_flag_does(tmp_path: Path) -> None:
    assert load_cloud_settings(tmp_path).prefix is None
    (tmp_path / "cloud.toml").write_text('[s3]\nuri = "s3://bkt/train"\ncache_max_gb = 2\n')
    settings = load_cloud_settings(tmp_path)
    assert settings.prefix == S3Uri("bkt", "train") and settings.cache_max_bytes == 2 << 30
    assert settings.cache_dir == tmp_path / "s3-cache"
    assert load_cloud_settings(tmp_path, "s3://flag-bkt/x").prefix == S3Uri("flag-bkt", "x")
    (tmp_path / "cloud.toml").write_text('[s3]\nuri = "http://bkt"\n')
    with pytest.raises(TrainManagementError) as caught:
        load_cloud_settings(tmp_path)
    assert "cloud.toml" in caught.value.message and "s3://" in caught.value.message


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('[s3]\nurl = "s3://bkt/train"\n', "unknown key(s) url"),  # a typo would silently mean "no prefix"
        ('[s3]\nuri = "s3://bkt/train"\ncache_max_gb = true\n', "cache_max_gb must be a positive number"),
        ('[s3]\nuri = "s3://bkt/train"\ncache_max_gb = 0\n', "cache_max_gb must be a positive number"),
        ('s3 = "s3://bkt/train"\n', "[s3] must be a table"),
        ("[s3\n", "cannot be read"),
    ],
)
def test_a_bad_s3_table_is_refused_with_the_file_and_key(tmp_path: Path, toml: str, words: str) -> None:
    (tmp_path / "cloud.toml").write_text(toml)
    with pytest.raises(TrainManagementError) as caught:
        load_cloud_settings(tmp_path)
    assert words in caught.value.message and "cloud.toml" in caught.value.message


def test_download_and_upload_events_show_as_progress() -> None:
    assert human_bytes(1_200_000_000, 6_900_000_000) == "1.2/6.9 GB"
    assert human_bytes(512, 2048) == "0.5/2.0 KB" and human_bytes(3, 10) == "3/10 B"
    events = [
        {
            "kind": "download",
            "what": "model",
            "uri": "s3://b/m",
            "done": 1_200_000_000,
            "total": 6_900_000_000,
        }
    ]
    progress = summarize(events, []).progress
    assert progress["phase"] == "downloading model 1.2/6.9 GB" and progress["download"]["uri"] == "s3://b/m"
    later = summarize([*events, {"kind": "downloaded", "total": 10, "fetched": 0}], []).progress
    assert later["phase"] == "starting" and later["download"] == {"total": 10, "fetched": 0}
    up = summarize([{"kind": "s3_upload", "uri": "s3://b/o/", "done": 5_000_000, "total": 10_000_000}], [])
    assert up.progress["phase"] == "uploading to S3 5.0/10.0 MB"
    assert summarize([{"kind": "s3_uploaded", "uris": ["s3://b/o/x"]}], []).progress["s3_outputs"] == [
        "s3://b/o/x"
    ]
