"""Raw companies -> a clean table (CSV, written with pandas) -> its line count (read as text)."""

from kedro.pipeline import Node, Pipeline

from .nodes import clean_companies, count_lines


def create_pipeline() -> Pipeline:
    return Pipeline([
        Node(clean_companies, "companies", "company_table@pandas", name="clean_companies"),
        # The same file through another dataset type: Kedro's transcoding.
        Node(count_lines, "company_table@text", "company_line_count", name="count_lines"),
    ])
