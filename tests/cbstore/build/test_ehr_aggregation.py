"""The hourly aggregation of numeric EHR events (``ehr_numeric.sql``) against a reference that sorts every hour.

``ehr_numeric.sql`` sorts an hour's events only where the order or a duplicate could change the
result. These tests check that it gives the float64 values, bit for bit, of the rule it implements:
drop exact duplicate events, sort the hour's (charttime, value) pairs, then add them from first to
last (``mean``, ``sum``), take the largest (``max``) or the last pair's value (``last``).
"""

from __future__ import annotations

import functools
import operator
import random
from datetime import datetime

import pandas as pd
import pytest
from support import write_tiny_source

from cbstore.build.cohort import select_cohort
from cbstore.build.ehr import load_ehr_tables, load_variables
from cbstore.build.extract import Extractor, load_sql
from cbstore.build.sources import locate_mimic_iv

VARIABLES = """variables:
  - {name: v_mean, source: chartevents, itemids: [1, 2], unit: u, range: [-1000, 1000], agg: mean, kind: continuous}
  - {name: v_sum, source: outputevents, itemids: [3], unit: u, range: [-1000, 1000], agg: sum, kind: continuous}
  - {name: v_last, source: chartevents, itemids: [4, 5], unit: u, range: [-1000, 1000], agg: last, kind: continuous}
  - {name: v_max, source: chartevents, itemids: [6], unit: u, range: [-1000, 1000], agg: max, kind: continuous}
"""
AGG = {0: "mean", 1: "sum", 2: "last", 3: "max"}
ITEM_VAR = {1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 3}
T0 = datetime(2150, 1, 1)


@pytest.fixture()
def con(tmp_path):
    """A build's DuckDB connection with these variables' tables (the tiny source's cohort is not used)."""
    path = tmp_path / "variables.yaml"
    path.write_text(VARIABLES)
    iv, _ = write_tiny_source(tmp_path / "src")
    with Extractor(locate_mimic_iv(iv), tmp_path / "work", threads=2) as extractor:
        select_cohort(extractor, min_age=18, window_hours=48)
        load_ehr_tables(extractor, load_variables(path))
        extractor.con.execute(load_sql("ehr_events_create"))
        yield extractor.con


def aggregate(con, events):
    """(stay, hour, var) -> value from ehr_numeric.sql over ``events`` (stay, hour, seconds, itemid, num)."""
    rows = pd.DataFrame(events, columns=["stay_idx", "hour", "seconds", "itemid", "num"])
    rows["charttime"] = T0 + pd.to_timedelta(rows["hour"] * 3600 + rows["seconds"], unit="s")
    con.execute("DELETE FROM ehr_events")
    con.execute("INSERT INTO ehr_events SELECT stay_idx, hour, charttime, itemid, num, NULL FROM rows")
    con.execute(load_sql("ehr_numeric_valid"))
    rows = con.execute(load_sql("ehr_numeric"), {"first": 0, "last": 10 ** 6}).fetchall()
    return {(s, h, v): value for s, h, v, value in rows}


def reference(events):
    """The rule ehr_numeric.sql implements, one hour at a time, in Python."""
    hours: dict[tuple, list] = {}
    for s, h, sec, item, num in sorted(set(events)):  # exact duplicates dropped
        hours.setdefault((s, h, ITEM_VAR[item]), []).append((sec, num))
    out = {}
    for key, pairs in hours.items():
        pairs.sort()
        values = [v for _, v in pairs]
        total = functools.reduce(operator.add, values)  # first to last, as the store promises
        out[key] = {"mean": total / len(values), "sum": total, "max": max(values), "last": pairs[-1][1]}[AGG[key[2]]]
    return out


def test_each_case_of_the_shortcut(con):
    events = [
        (0, 0, 10, 1, 0.3), (0, 0, 5, 1, 0.2), (0, 0, 1, 1, 0.1),  # mean of three: added in charttime order
        (0, 1, 1, 1, 7.0),                                         # one event
        (0, 2, 1, 1, 2.5), (0, 2, 1, 1, 2.5),                      # duplicate pair of a mean
        (0, 3, 1, 1, 2.5), (0, 3, 1, 2, 2.5),                      # same time and value, two items: two events
        (0, 4, 1, 1, 1.0), (0, 4, 2, 1, 1.0), (0, 4, 2, 1, 1.0), (0, 4, 3, 1, 2.0),  # four rows, three events
        (1, 0, 1, 3, 40.0), (1, 0, 1, 3, 40.0),                    # duplicate pair of a sum counts once
        (1, 1, 1, 3, 40.0), (1, 1, 2, 3, 40.0),                    # two events of a sum
        (1, 2, 1, 3, 0.1), (1, 2, 2, 3, 0.2), (1, 2, 3, 3, 0.3), (1, 2, 3, 3, 0.3),
        (2, 0, 9, 4, 1.0), (2, 0, 1, 4, 5.0),                      # last: the later event, though smaller
        (2, 1, 4, 4, 1.0), (2, 1, 4, 5, 5.0),                      # last at equal times: the larger value
        (2, 2, 4, 4, 3.0), (2, 2, 2, 5, 9.0), (2, 2, 4, 5, 2.0),   # last of three
        (2, 3, 4, 4, 3.0), (2, 3, 4, 4, 3.0),                      # last of a duplicate pair
        (3, 0, 1, 6, -2.0), (3, 0, 2, 6, 8.0), (3, 0, 3, 6, 8.0), (3, 0, 3, 6, 1.0),  # max
    ]
    got = aggregate(con, events)
    assert got == reference(events)
    assert got[(0, 0, 0)] == (0.1 + 0.2 + 0.3) / 3 != (0.3 + 0.2 + 0.1) / 3
    assert got[(0, 2, 0)] == 2.5 and got[(0, 3, 0)] == 2.5 and got[(0, 4, 0)] == 4.0 / 3
    assert got[(1, 0, 1)] == 40.0 and got[(1, 1, 1)] == 80.0
    assert got[(2, 0, 2)] == 1.0 and got[(2, 1, 2)] == 5.0 and got[(2, 2, 2)] == 3.0 and got[(2, 3, 2)] == 3.0
    assert got[(3, 0, 3)] == 8.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_hours_equal_sorting_every_hour(con, seed):
    rng = random.Random(seed)
    values = [0.1, 0.2, 0.3, 0.7, 1e-3, 999.9, -999.9, 3.3, 12.5]  # sums of these depend on the order
    events = []
    for stay in range(40):
        for hour in range(4):
            for item in ITEM_VAR:
                for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 5])):
                    event = (stay, hour, rng.randrange(4), item, rng.choice(values))  # few times: ties
                    events += [event] * rng.choice([1, 1, 1, 2])                       # some duplicated
    rng.shuffle(events)
    assert aggregate(con, events) == reference(events)
