"""Infinity's generated client (`infinity-client`, made from infinity_emb's OpenAPI document) and
LangChain's InfinityRerank (built on it), pointed at BASE_URL: prints what they parsed as JSON.

Run in its own install (`pip install --target`): infinity-client pins httpx<0.28, which the
test environment's LiteLLM does not allow. Usage: infinity_calls.py BASE_URL EMBEDDER RERANKER
CLASSIFIER TEXT...
"""

import json
import sys

from infinity_client import Client
from infinity_client.api.default import classify, embeddings, health, models, rerank
from infinity_client.models import ClassifyInput, OpenAIEmbeddingInputText, RerankInput

base_url, embedder, reranker, classifier, *texts = sys.argv[1:]
client = Client(base_url=base_url, raise_on_unexpected_status=True)
out = {}

listed = models.sync(client=client)
out["models"] = [{"id": m.id, "owned_by": m.owned_by.value, "capabilities": sorted(m.capabilities),
                  "backend": m.backend} for m in listed.data]
out["health"] = health.sync_detailed(client=client).status_code
# the client's defaults: model "default/not-specified", dimensions 0
default = embeddings.sync(client=client, body=OpenAIEmbeddingInputText(input_=texts))
named = embeddings.sync(client=client, body=OpenAIEmbeddingInputText(input_=texts, model=embedder,
                                                                     dimensions=32))
out["default"] = {"model": default.model, "vectors": [d.embedding for d in default.data],
                  "tokens": default.usage.total_tokens, "id": default.id}
out["named"] = {"model": named.model, "vectors": [d.embedding for d in named.data]}
ranked = rerank.sync(client=client, body=RerankInput(query=texts[0], documents=texts,
                                                     return_documents=True, model=reranker))
out["rerank"] = [{"index": r.index, "relevance_score": r.relevance_score, "document": r.document}
                 for r in ranked.results]
labels = classify.sync(client=client, body=ClassifyInput(input_=texts, model=classifier))
out["classify"] = [[{"label": x.label, "score": x.score} for x in row] for row in labels.data]

from langchain_community.document_compressors.infinity_rerank import InfinityRerank  # noqa: E402

compressor = InfinityRerank(client=client, model=reranker, top_n=2)
out["langchain"] = compressor.rerank(texts, texts[0])
print(json.dumps(out))
