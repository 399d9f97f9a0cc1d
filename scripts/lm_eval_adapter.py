"""Our GPT as an lm-eval language model: log-likelihoods of continuations, rolling
log-likelihoods of whole texts, and greedy generation, from a model in one process."""

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


class GPTLM(TemplateLM):
    """lm-eval's view of a GPT and its tokenizer.

    lm-eval splits each request into context and continuation ids (trailing spaces of the
    context go to the continuation, and an empty context becomes the end-of-text id); this
    class scores them. Inputs longer than the model's sequence keep their last ids. The
    padded vocabulary ids, which no text uses, are left out of every softmax.
    """

    def __init__(self, model, tokenizer, batch_size, autocast):
        super().__init__()
        self.model = model.eval()
        self.tokenizer_ids = tokenizer
        self.batch_size = batch_size
        self.autocast = autocast
        self._device = next(model.parameters()).device  # lm-eval reads it as `device`
        self.max_length = model.config.sequence_length

    @property
    def eot_token_id(self):
        return self.tokenizer_ids.eot

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """The ids of `string`."""
        return self.tokenizer_ids.encode(string)

    @torch.no_grad()
    def log_probs(self, inputs):
        """Log-probabilities over the real vocabulary of the next id at every position of
        `inputs` (rows of one length)."""
        with self.autocast:
            logits = self.model(inputs)
        return F.log_softmax(logits[..., : self.tokenizer_ids.vocab_size].float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """(sum of log-probabilities, whether greedy decoding gives it) of each request's
        continuation ids after its context ids."""
        rows = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-(self.max_length + 1) :]
            rows.append((ids[:-1], ids[-len(continuation) :]))
        # Longest first, so each batch pads its rows to nearly their own length.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(rows[batch[0]][0])
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                inputs[row, : len(rows[i][0])] = torch.tensor(rows[i][0])
            log_probs = self.log_probs(inputs.to(self.device))
            for row, i in enumerate(batch):
                inputs_len, target = len(rows[i][0]), torch.tensor(rows[i][1], device=self.device)
                # The model is causal: the padding right of a row never reaches its positions.
                scores = log_probs[row, inputs_len - len(target) : inputs_len]
                total = scores.gather(1, target[:, None]).sum().item()
                results[i] = (total, bool((scores.argmax(dim=-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """The log-likelihood of each whole text, scored in windows of the model's sequence."""
        totals = []
        for (text,) in (r.args for r in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pieces = [(None, *make_disjoint_window(w)) for w in windows]
            totals.append(sum(score for score, _ in self._loglikelihood_tokens(pieces)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        """Greedy continuations of each context, cut at the first of its `until` strings."""
        outputs = []
        for context, options in (r.args for r in requests):
            until = options.get("until") or [self.tokenizer_ids.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else until
            ids = self.tok_encode(context)[-self.max_length :] or [self.eot_token_id]
            new_ids = []
            for _ in range(options.get("max_gen_toks", 256)):
                window = torch.tensor([(ids + new_ids)[-self.max_length :]], device=self.device)
                next_id = int(self.log_probs(window)[0, -1].argmax())
                if next_id == self.eot_token_id:
                    break
                new_ids.append(next_id)
                text = self.tokenizer_ids.decode(new_ids)
                if any(stop in text for stop in until):
                    break
            text = self.tokenizer_ids.decode(new_ids)
            outputs.append(min((text.split(stop)[0] for stop in until), key=len))
        return outputs
