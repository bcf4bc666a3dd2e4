"""Dataset scanning, validation, buckets, captions and batches."""
