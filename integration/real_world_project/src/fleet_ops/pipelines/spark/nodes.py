import pandas as pd


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
    return to_spark(table)
