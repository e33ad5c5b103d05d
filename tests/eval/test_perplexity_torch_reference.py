"""Perplexity vs GPTQ's `llama_eval` loss loop written in torch on a tiny random Llama."""

import numpy as np
import pytest

from cdquant_jax.eval import perplexity

pytestmark = pytest.mark.hf


def test_matches_gptq_torch_loop():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(config).eval()
  seqlen, n_windows = 16, 5
  ids = torch.randint(0, 97, (1, n_windows * seqlen + 7))

  # GPTQ llama_eval: per window CE over logits[:, :-1] vs ids[:, 1:], nll = loss * seqlen,
  # ppl = exp(sum(nll) / (nsamples * seqlen)).
  nlls = []
  with torch.no_grad():
    for i in range(ids.numel() // seqlen):
      batch = ids[:, i * seqlen:(i + 1) * seqlen]
      logits = model(batch).logits.float()
      loss = torch.nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, 97), batch[:, 1:].reshape(-1))
      nlls.append(loss * seqlen)
  reference_ppl = torch.exp(torch.stack(nlls).sum() / (n_windows * seqlen)).item()

  def logits_fn(batch):
    with torch.no_grad():
      return model(torch.tensor(np.array(batch), dtype=torch.long)).logits.numpy()

  got = perplexity(logits_fn, ids.numpy(), seqlen=seqlen, batch_size=2)
  assert got["n_windows"] == n_windows and got["dropped_tokens"] == 7
  np.testing.assert_allclose(got["ppl"], reference_ppl, rtol=1e-5)
