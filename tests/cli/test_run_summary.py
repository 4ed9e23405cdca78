"""The last line of a run: the metric the task is judged by."""

from fedfleet.cli.run_job import headline


def test_a_click_model_is_summed_up_by_its_auc_and_log_loss_not_its_accuracy():
    final = {"test_accuracy": 0.5516, "test_auc": 0.73125, "test_log_loss": 0.51204, "train_loss": 0.6}
    assert headline(final) == "test AUC: 0.7312, log loss 0.5120"


def test_a_classifier_by_its_accuracy_and_a_run_without_either_by_nothing():
    assert headline({"test_accuracy": 0.9123}) == "test accuracy: 91.23%"
    assert headline({"test_party_accuracy": 0.5}) == "test accuracy: 50.00%"  # the parties' own evaluation
    assert headline({"train_loss": 0.1}) == ""
