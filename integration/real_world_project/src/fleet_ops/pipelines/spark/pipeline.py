"""Spark writes fleet@spark (parquet), pandas reads fleet@pandas: one dataset, two engines.
fleet_frame, an undeclared Spark DataFrame, cannot cross to another step."""

from kedro.pipeline import Node, Pipeline

from .nodes import regional_totals, spark_frame, to_spark


def create_pipeline() -> Pipeline:
    return Pipeline([
        Node(to_spark, "companies", "fleet@spark", name="to_spark"),
        Node(regional_totals, "fleet@pandas", "regional_totals", name="regional_totals"),
        Node(spark_frame, "companies", "fleet_frame", name="spark_frame", tags=["unpicklable"]),
        Node(len, "fleet_frame", "fleet_frame_rows", name="count_frame", tags=["unpicklable"]),
    ])
