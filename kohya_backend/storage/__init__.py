"""S3 (and S3-compatible) objects for models, datasets and LoRAs, and the local content-addressed cache.

The pieces, each usable alone (the SageMaker runner builds on them):
- `uri`: `S3Uri` / `parse_s3_uri` (strict `s3://bucket/key`), `is_s3_uri`, and `safe_relative_key`, the check
  every S3 key passes before it becomes a local path.
- `client`: `S3Client` over boto3 (standard credential chain and endpoint, standard retries): `head`, paged
  `list_objects`, `folders`, `read_range`, resumable verified `download`, `upload_file` (sha256 in the metadata; a file
  already there is not sent again); `describe_error` turns any failure into a StorageError naming bucket/key and
  the AWS error code.
- `cache`: `S3Cache`, blobs by sha256 keyed by (bucket, key, ETag, size), size-capped with LRU eviction;
  `fetch` hard-links an object's blob where a job needs it (under the lock eviction takes too).
- `sync`: `sync_prefix` (a prefix into a folder, only changed files) and `upload_folder`.
- `catalog`: `S3Catalog`, the models/ and datasets/ under a prefix for the lists; `read_safetensors_keys`.
- `settings`: `load_cloud_settings` (`--s3-uri`, the WebUI setting or HOME/cloud.toml).

boto3 is imported only when a client is made: everything here loads without it.
"""
