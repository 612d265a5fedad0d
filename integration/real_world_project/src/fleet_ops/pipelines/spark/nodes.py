from concurrent.futures import ThreadPoolExecutor

import pandas as pd

# Spark jobs submitted from a long-lived worker thread, as code that runs them concurrently does.
# py4j gives each thread its own connection to the JVM and closes it (logging at INFO) when the
# thread ends: for this pool's thread, at the end of the process, after a failed step's verdict.
_WORKERS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spark-jobs")


def _spark():
    from pyspark.sql import SparkSession

    # Local, loopback only, no UI: a laptop or a single step's container.
    return (SparkSession.builder.master("local[1]").appName("fleet_ops")
            .config("spark.ui.enabled", "false")
            .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.sql.shuffle.partitions", "1").getOrCreate())


def to_spark(table: pd.DataFrame):
    return _spark().createDataFrame(table[["company_id", "fleet_size", "region"]])


def regional_totals(fleet: pd.DataFrame) -> pd.DataFrame:
    totals = fleet.groupby("region", as_index=False)["fleet_size"].sum()
    return totals.sort_values("region").reset_index(drop=True)


def spark_frame(table: pd.DataFrame):
    return _WORKERS.submit(to_spark, table).result()
