"""What sample, export and eval write or read besides training data: normalised records (normalize), mixtures
for other trainers (mixture), output files (record_writer, parquet_out), checkable answers (answers)."""
