"""Assembly of task / fold / cohort / feature mode into FusionData: cohorts, masks, encoders, leakage."""

import numpy as np
import pytest

from cbstore.inputs.masks import cxr_drop_mask
from fusion.data import FusionDataError, load_fusion_data
from fusion.modules import EmbeddingInput
from support import CXR_ID, EHR_ID, EHR_PERFOLD_ID, make_fusion_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_fusion_store(tmp_path_factory.mktemp("data") / "store.zarr", n_stays=80)


def test_parts_follow_the_store_splits_and_task(store):
    data = load_fusion_data(store, "los", 1, ehr_encoder=EHR_ID)
    usable = store.task_mask("los")
    for name, part in data.parts.items():
        expected = store.indices(1, name)
        np.testing.assert_array_equal(part.index, expected[usable[expected]])
        np.testing.assert_array_equal(part.stay_id, store.stay_ids[part.index])
        np.testing.assert_array_equal(part.y, store.labels("los")[part.index])
    assert data.label_names == store.label_names("los") and data.n_outputs == 7 and data.multiclass
    assert data.part("train").y.dtype == np.int64
    binary = load_fusion_data(store, "mortality", 1, ehr_encoder=EHR_ID)
    assert binary.part("test").y.shape == (len(binary.part("test")), 1)


@pytest.mark.parametrize("cohort,matched_parts", [
    ("full", ()), ("matched", ("train", "val", "test")),
    ("matched_to_full", ("train", "val")), ("full_to_matched", ("test",))])
def test_cohorts(store, cohort, matched_parts):
    data = load_fusion_data(store, "mortality", 0, cohort=cohort, ehr_encoder=EHR_ID)
    for name, part in data.parts.items():
        if name in matched_parts:
            assert part.cxr_present.all()
        else:
            assert not part.cxr_present.all(), f"{name} keeps the stays without X-ray"
            assert len(part) == len(store.indices(0, name))


def test_mask_applies_on_top_of_natural_missingness_on_chosen_parts(store):
    plain = load_fusion_data(store, "mortality", 0, ehr_encoder=EHR_ID)
    data = load_fusion_data(store, "mortality", 0, ehr_encoder=EHR_ID, cxr_missing_rate=0.5,
                            missing_at=("val", "test"), mask_seed=4)
    np.testing.assert_array_equal(data.part("train").cxr_present, plain.part("train").cxr_present)
    for name in ("val", "test"):
        part, before = data.part(name), plain.part(name)
        drop = cxr_drop_mask(part.stay_id, 0.5, 4)
        np.testing.assert_array_equal(part.cxr_present, before.cxr_present & ~drop)
        np.testing.assert_array_equal(part.cxr_masked, before.cxr_present & drop)
        assert np.isnan(part.cxr_emb[~part.cxr_present]).all()
        assert not np.isnan(part.cxr_emb[part.cxr_present]).any()
    assert data.part("test").cxr_masked.any()


def test_per_fold_encoder_reads_this_fold(store):
    shared = load_fusion_data(store, "mortality", 2, ehr_encoder=EHR_ID)
    per_fold = load_fusion_data(store, "mortality", 2, ehr_encoder=EHR_PERFOLD_ID)
    # the fixture writes fold k of the per-fold encoder as the shared values + k
    np.testing.assert_allclose(per_fold.part("test").ehr_emb, shared.part("test").ehr_emb + 2)
    assert per_fold.ehr_encoder == EHR_PERFOLD_ID and per_fold.cxr_encoder == CXR_ID


def test_raw_inputs(store):
    data = load_fusion_data(store, "phenotype", 0, features="raw")
    part = data.part("val")
    assert part.ehr.shape == (len(part), store.window_hours, len(store.features))
    assert np.isfinite(part.ehr).all() and set(np.unique(part.ehr_mask)) <= {0.0, 1.0}
    rows = np.arange(len(part))
    images = part.images(rows)
    assert images.shape == (len(part), 1, store.image_size, store.image_size)
    assert (images[~part.cxr_present] == 0).all()
    shown = images[part.cxr_present]
    assert shown.min() >= -1024 and shown.max() <= 1024 and shown.std() > 0
    assert part.ehr_emb is None and data.ehr_encoder is None


def test_raw_ehr_is_normalised_with_training_statistics_only(store):
    data = load_fusion_data(store, "mortality", 0, features="raw", inputs={"ehr_ts"})
    other = load_fusion_data(store, "mortality", 1, features="raw", inputs={"ehr_ts"})
    shared = np.intersect1d(data.part("test").stay_id, other.part("train").stay_id)
    assert shared.size, "fixture: some stay is tested in fold 0 and trained on in fold 1"
    i = np.searchsorted(data.part("test").stay_id, shared[0])
    j = np.searchsorted(other.part("train").stay_id, shared[0])
    assert not np.allclose(data.part("test").ehr[i], other.part("train").ehr[j]), \
        "the same stay is scaled with each fold's own training statistics"


def test_embedding_statistics_ignore_absent_rows():
    values = np.array([[1.0, 2.0], [3.0, 2.0], [np.nan, np.nan]], dtype=np.float32)
    mean, std = EmbeddingInput.statistics(values)
    np.testing.assert_allclose(mean, [2.0, 2.0])
    np.testing.assert_allclose(std, [1.0, 1.0])  # constant dimension -> 1


def test_errors(store):
    with pytest.raises(FusionDataError, match="unknown task 'survival'"):
        load_fusion_data(store, "survival", 0)
    with pytest.raises(FusionDataError, match="unknown cohort"):
        load_fusion_data(store, "mortality", 0, cohort="paired")
    with pytest.raises(FusionDataError, match=r"fold 7 out of range: .* folds 0\.\.2"):
        load_fusion_data(store, "mortality", 7)
    with pytest.raises(FusionDataError, match="several ehr embeddings"):
        load_fusion_data(store, "mortality", 0)
    with pytest.raises(FusionDataError, match=f"unknown cxr encoder 'x'.*{CXR_ID}"):
        load_fusion_data(store, "mortality", 0, ehr_encoder=EHR_ID, cxr_encoder="x")
    with pytest.raises(FusionDataError, match="part 'train' not loaded"):
        load_fusion_data(store, "mortality", 0, ehr_encoder=EHR_ID, parts=("test",)).part("train")
