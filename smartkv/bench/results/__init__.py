"""What comes out: the Parquet row schema, the result store (one file per job, atomic), and the report."""
