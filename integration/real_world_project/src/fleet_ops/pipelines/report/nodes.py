def build_report(metrics: dict, line_count: int) -> str:
    return (f"# Fleet model\n\ncompanies: {line_count}\nrows: {metrics['rows']}\n"
            f"alpha: {metrics['alpha']}\nmae: {metrics['mae']}\n")
