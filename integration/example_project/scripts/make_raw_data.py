"""Generate the example project's raw data deterministically (data/01_raw/*.csv).

Run from the project directory: ``python scripts/make_raw_data.py [--shuttles N]``.
The committed files were made with the defaults; benchmarks pass a larger ``--shuttles``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

LOCATIONS = ["Niue", "Anguilla", "Russian Federation", "Barbados", "Sao Tome", "Malta", "Chile"]
SHUTTLE_TYPES = ["Type V5", "Type F5", "Type A1", "Type Z2"]
ENGINE_TYPES = ["Plasma", "Quantum", "Nuclear"]
VENDORS = ["ThetaBase Services", "Banks, Wood and Phillips", "Enterprises Tech"]
POLICIES = ["strict", "moderate", "flexible"]


def make(shuttles: int, seed: int = 7) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    n_companies = max(10, shuttles // 4)
    companies = pd.DataFrame(
        {
            "id": np.arange(1, n_companies + 1),
            "company_rating": [f"{r}%" for r in rng.integers(50, 101, n_companies)],
            "company_location": rng.choice(LOCATIONS, n_companies),
            "total_fleet_count": rng.integers(1, 40, n_companies).astype(float),
            "iata_approved": rng.choice(["t", "f"], n_companies),
        }
    )
    engines = rng.integers(1, 5, shuttles)
    capacity = rng.integers(2, 12, shuttles)
    crew = rng.integers(1, 6, shuttles)
    d_check = rng.choice(["t", "f"], shuttles)
    moon = rng.choice(["t", "f"], shuttles)
    company_id = rng.integers(1, n_companies + 1, shuttles)
    base_price = 400 + 300 * engines + 120 * capacity + 40 * crew + rng.normal(0, 150, shuttles)
    shuttles_df = pd.DataFrame(
        {
            "id": np.arange(10_001, 10_001 + shuttles),
            "shuttle_location": rng.choice(LOCATIONS, shuttles),
            "shuttle_type": rng.choice(SHUTTLE_TYPES, shuttles),
            "engine_type": rng.choice(ENGINE_TYPES, shuttles),
            "engine_vendor": rng.choice(VENDORS, shuttles),
            "engines": engines.astype(float),
            "passenger_capacity": capacity,
            "cancellation_policy": rng.choice(POLICIES, shuttles),
            "crew": crew.astype(float),
            "d_check_complete": d_check,
            "moon_clearance_complete": moon,
            "price": [f"${p:,.1f}" for p in np.maximum(base_price, 50)],
            "company_id": company_id,
        }
    )
    reviews = pd.DataFrame(
        {
            "shuttle_id": shuttles_df["id"],
            "review_scores_rating": rng.integers(60, 101, shuttles).astype(float),
            "number_of_reviews": rng.integers(0, 300, shuttles),
        }
    )
    return {"companies": companies, "shuttles": shuttles_df, "reviews": reviews}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shuttles", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=Path("data/01_raw"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, frame in make(args.shuttles).items():
        frame.to_csv(args.out / f"{name}.csv", index=False)


if __name__ == "__main__":
    main()
