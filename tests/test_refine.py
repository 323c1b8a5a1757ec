"""studies.refine: AdaGen's repeated sampling (Algorithm 2) keeps each request's best-scored candidate."""
import torch

from experiments import studies


def test_repeat_one_is_plain_sampling_and_k_keeps_the_argmax():
    labels = torch.tensor([3, 5])
    calls = []

    def make_images(y):                                                      # candidate i of a batch: value 10 i + y
        calls.append(y.tolist())
        return (torch.arange(len(y)) * 10 + y).float()[:, None]

    assert torch.equal(studies.refine(make_images, labels, 1, None), make_images(labels))
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.8])                   # request 0: cand. 1; request 1: cand. 5
    out = studies.refine(make_images, labels, 3, lambda images, y: scores)
    assert calls[-1] == [3, 3, 3, 5, 5, 5]                                   # each request's candidates consecutive
    assert out[:, 0].tolist() == [10 + 3, 50 + 5]
    a = studies.refine(make_images, labels, 3, studies.random_scores(0))      # the control: seeded random picks
    b = studies.refine(make_images, labels, 3, studies.random_scores(0))
    assert torch.equal(a, b)
