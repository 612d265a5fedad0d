def notify(status: dict, metrics: dict) -> str:
    return f"pipeline {status['state']}: mae {metrics['mae']}\n"
