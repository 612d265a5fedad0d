import pandas as pd


def clean_companies(companies: pd.DataFrame) -> pd.DataFrame:
    table = companies.dropna().copy()
    table["region"] = table["region"].str.upper()
    table["fleet_per_year"] = (table["fleet_size"] / table["age_years"]).round(4)
    return table.sort_values("company_id").reset_index(drop=True)


def count_lines(text: str) -> int:
    return len([line for line in text.splitlines() if line.strip()]) - 1  # minus the header
