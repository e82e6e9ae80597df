"""Reading records where users keep them: record formats (records), sources and tables (sources), records by
position (record_reader)."""
