"""The one read path (cbstore.inputs.reader) and the one task object (cbstore.format.tasks, fusion.tasks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbstore.errors import CbstoreError, InputsError, UnknownTaskError
from cbstore.format import schema
from cbstore.format.tasks import TASK_SPECS, TASKS, get_task
from cbstore.inputs.dataset import PartBatches, StayDataset
from cbstore.inputs.reader import EhrPreprocessor, FoldReader, read_inputs, select_stays
from fusion import tasks as ftasks
from fusion.data import load_fusion_data
from fusion.trainer import choose_monitor, monitor_score, probabilities, task_loss
from support import CXR_ID, EHR_ID, make_fusion_store

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_fusion_store(tmp_path_factory.mktemp("read") / "store.zarr", n_stays=60)


# ------------------------------------------------------------------------------------ read path

def test_every_consumer_gets_the_same_ehr_inputs(store):
    """Fusion parts, the torch Dataset and the ehr-lstm encoder share one preprocessing."""
    from encoders.ehr_seq import EhrLstmEncoder

    fold = 1
    fused = load_fusion_data(store, "mortality", fold, features="raw", inputs={"ehr_ts"}).part("val")
    dataset = StayDataset(store, "mortality", fold, "val", with_images=False)
    np.testing.assert_array_equal(dataset.positions, fused.index)
    items = [dataset[i] for i in range(len(dataset))]
    np.testing.assert_array_equal(torch.stack([it["ehr"] for it in items]).numpy(), fused.ehr)
    np.testing.assert_array_equal(torch.stack([it["ehr_mask"] for it in items]).numpy(), fused.ehr_mask)
    np.testing.assert_array_equal(torch.stack([it["y"] for it in items]).numpy(), fused.y)
    raw = store.ehr_values(fused.index)
    encoder_input, mask = EhrLstmEncoder.prepare(raw, EhrPreprocessor.from_store(store, fold))
    n_features = raw.shape[2]
    np.testing.assert_array_equal(encoder_input[..., :n_features], fused.ehr)
    np.testing.assert_array_equal(mask, fused.ehr_mask)
    np.testing.assert_array_equal(fused.ehr_mask, store.ehr_observed(fused.index).astype(np.float32))
    batch = PartBatches(fused, {"ehr_ts"})[np.arange(3)]
    assert torch.equal(batch["ehr"], torch.from_numpy(fused.ehr[:3]))
    assert set(batch) == {"y", "cxr_present", "cxr_hours", "ehr", "ehr_mask"}


def test_statistics_come_from_the_fold_training_part(store):
    rows = select_stays(store, "mortality", 0, "test")
    a = read_inputs(store, 0, rows, inputs={"ehr_ts"})
    b = read_inputs(store, 1, rows, inputs={"ehr_ts"})
    assert not np.allclose(a.ehr, b.ehr), "each fold scales with its own training statistics"
    assert a.y is None, "no task, no targets"


def test_hidden_xrays_count_as_absent_everywhere(store):
    rows = select_stays(store, "mortality", 0, "train", "matched")
    assert store.cxr_present[rows].all() and rows.size >= 4
    hidden = np.zeros(rows.size, dtype=bool)
    hidden[:2] = True
    reader = FoldReader(store, 0, task="mortality", inputs={"cxr_emb", "cxr_img"}, cxr_encoder=CXR_ID)
    x = reader.read(rows, name="train", cxr_hidden=hidden)
    np.testing.assert_array_equal(x.cxr_present, ~hidden)
    np.testing.assert_array_equal(x.cxr_masked, hidden)
    assert np.isnan(x.cxr_emb[hidden]).all() and not np.isnan(x.cxr_emb[~hidden]).any()
    assert np.isnan(x.cxr_hours[hidden]).all()
    np.testing.assert_allclose(x.cxr_hours[~hidden],
                               store.cxr["hours_before_prediction"].to_numpy()[rows[~hidden]])
    images = x.images(np.arange(rows.size))
    assert not images[hidden].any() and images[~hidden].std() > 0
    assert reader.cxr_encoder == CXR_ID and reader.cxr_dim == x.cxr_emb.shape[1]


def test_cohorts_select_the_stays(store):
    full = select_stays(store, "los", 2, "test")
    matched = select_stays(store, "los", 2, "test", "matched")
    np.testing.assert_array_equal(matched, full[store.cxr_present[full]])
    assert store.task_mask("los")[full].all()
    np.testing.assert_array_equal(select_stays(store, "los", 2, "test", "full_to_matched"), matched)
    np.testing.assert_array_equal(select_stays(store, "los", 2, "val", "full_to_matched"),
                                  select_stays(store, "los", 2, "val"))


def test_read_path_errors_name_the_value(store):
    with pytest.raises(InputsError, match=r"unknown input kind\(s\) \['ehr_text'\]"):
        FoldReader(store, 0, inputs={"ehr_text"})
    with pytest.raises(InputsError, match=r"fold 5 out of range: .* folds 0\.\.2"):
        FoldReader(store, 5)
    with pytest.raises(InputsError, match="unknown cohort 'paired'"):
        select_stays(store, "mortality", 0, "train", "paired")
    with pytest.raises(InputsError, match="unknown part 'dev'"):
        select_stays(store, "mortality", 0, "dev")
    with pytest.raises(InputsError, match="positions out of range"):
        read_inputs(store, 0, [store.n_stays])
    with pytest.raises(InputsError, match="cxr_hidden has shape"):
        read_inputs(store, 0, [0, 1], cxr_hidden=[True])
    with pytest.raises(InputsError, match="several ehr embeddings"):
        FoldReader(store, 0, inputs={"ehr_emb"})
    with pytest.raises(InputsError, match="read without X-ray images"):
        read_inputs(store, 0, [0]).images([0])
    with pytest.raises(UnknownTaskError, match="valid tasks: mortality, mortality_hosp, phenotype, los"):
        select_stays(store, "survival", 0, "train")
    assert read_inputs(store, 0, [0], inputs={"ehr_emb"}, ehr_encoder=EHR_ID).ehr_emb.shape == (1, 6)


# ------------------------------------------------------------------------------------- TaskSpec

def test_task_specs_describe_every_store_task():
    assert TASKS == schema.TASKS
    kinds = {name: spec.kind for name, spec in TASK_SPECS.items()}
    assert kinds == {"mortality": "binary", "mortality_hosp": "binary", "phenotype": "multilabel",
                     "los": "multiclass"}
    los = get_task("los")
    assert (los.loss, los.probabilities, los.monitor, los.n_classes) == ("cross_entropy", "softmax",
                                                                         "macro_f1", 7)
    assert get_task(los) is los
    assert get_task("phenotype").label_names(["a", "b"]) == ["a", "b"]
    assert get_task("mortality").label_names() == ["mortality"]
    with pytest.raises(UnknownTaskError) as err:
        get_task("ihm")
    assert isinstance(err.value, CbstoreError)
    assert str(err.value) == "unknown task 'ihm'; valid tasks: mortality, mortality_hosp, phenotype, los"


def test_targets_and_usable_stays():
    y, usable = get_task("los").targets(np.array([-1, 0, 6, 7], dtype=np.int8), 7)
    assert y.dtype == np.int64 and usable.tolist() == [False, True, True, False]
    y, usable = get_task("phenotype").targets(np.array([[0, 1], [1, -1]], dtype=np.int8), 2)
    assert y.dtype == np.float32 and y.shape == (2, 2) and usable.tolist() == [True, False]
    y, _ = get_task("mortality").targets(np.array([0, 1], dtype=np.int8), 1)
    assert y.shape == (2, 1)


def test_store_reads_labels_through_the_task_specs(store):
    assert store.label_names("los") == list(schema.LOS_CLASS_NAMES)
    assert store.labels("phenotype").shape == (store.n_stays, len(store.phenotype_names))
    np.testing.assert_array_equal(store.task_mask("los"), store.labels("los") >= 0)


@pytest.mark.parametrize("task", ["los", get_task("los")])
def test_multiclass_loss_probabilities_and_monitor(task):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    assert torch.allclose(task_loss(logits, y, task), torch.nn.functional.cross_entropy(logits, y))
    prob = probabilities(logits, task)
    assert torch.allclose(prob.sum(dim=1), torch.ones(2))
    back = ftasks.probabilities(ftasks.logit_of_mean_probability([prob], [torch.ones(2)], task), task)
    assert torch.allclose(back, prob, atol=1e-6)
    assert choose_monitor(task, np.array([0, 1])) == "macro_f1"
    assert monitor_score("macro_f1", task, np.array([0, 2]), prob.numpy()) == pytest.approx(1 / 3)


def test_sigmoid_tasks_fall_back_to_val_loss_on_one_class():
    assert choose_monitor("phenotype", np.array([[0, 1], [1, 1]])) == "macro_auroc"
    assert choose_monitor("mortality", np.zeros((4, 1))) == "val_loss"
    logits = torch.tensor([[0.3], [-0.2]])
    assert torch.allclose(probabilities(logits, "mortality"), torch.sigmoid(logits))
    with pytest.raises(UnknownTaskError, match="valid tasks"):
        task_loss(logits, torch.zeros(2, 1), "survival")
