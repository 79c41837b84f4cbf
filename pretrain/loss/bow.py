"""The bag-of-words objective's loss: softmax cross-entropy over the vocabulary against the
caption's normalised bag of words (CLIP paper, arXiv 2103.00020, Figure 2's "Bag of Words
Prediction" baseline; the softmax form of Joulin et al. 2016 and Mahajan et al. 2018, not a
sigmoid per word).

Input: the bag-of-words model's ``(word_logits [b, vocab], tokens [b, L])``
(pretrain/models/bow.py builds the bag from the tokens). Per caption:
``-sum_w bag(w) log softmax(logits)(w)``; a caption without any word (empty text) has no
target and does not count. The mean is over the captions with words of the global batch:
rank r returns ``world_size / C * sum of its captions' losses`` with C all-reduced, so that
averaging the ranks' losses and parameter gradients gives the full-batch mean exactly (the
package convention, common.py).

Run the tests: `.venv/bin/python -m pytest -q tests/test_loss_objectives.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.loss.gather import global_sum, world_info
from pretrain.models.bow import bag_of_words


def bow_loss(word_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Softmax bag-of-words cross-entropy of this rank's captions, normalised by the global
    number of captions that have words. A global batch with no word at all is an error."""
    if word_logits.dim() != 2 or tokens.dim() != 2 or word_logits.shape[0] != tokens.shape[0]:
        raise ValueError(f"bow_loss takes word_logits [b, vocab] and tokens [b, L]; got "
                         f"{tuple(word_logits.shape)} and {tuple(tokens.shape)}")
    bag = bag_of_words(tokens, word_logits.shape[1])
    has_words = bag.sum(dim=1) > 0
    _, world = world_info()
    total = global_sum(has_words.sum().to(torch.float32))
    if float(total) == 0:
        raise ValueError("bow_loss: no caption of the global batch has a word")
    local_sum = -(bag * F.log_softmax(word_logits.float(), dim=-1)).sum()
    return local_sum * (world / total)
