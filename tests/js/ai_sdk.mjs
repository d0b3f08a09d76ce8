// The Vercel AI SDK against a running server, pointed at it only through each provider's baseURL.
// Usage: node tests/js/ai_sdk.mjs <base_url> '<json: {model, rerankModel, texts, query,
// documents}>'. Prints one JSON object, what each call returned, for tests/test_clients.py to
// compare with the server's own /v1/embeddings and /v1/rerank.
import { createCohere } from "@ai-sdk/cohere";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { embedMany, rerank } from "ai";

const [baseURL, spec] = process.argv.slice(2);
if (!baseURL || !spec) {
  console.error("usage: node ai_sdk.mjs <base_url> '<json>'");
  process.exit(2);
}
const { model, rerankModel, texts, query, documents } = JSON.parse(spec);

// OpenAI's shape at /v1 (POST /v1/embeddings); Cohere's v2 at /v2 (POST /v2/embed, /v2/rerank)
const compatible = createOpenAICompatible({
  name: "embedding-worker", baseURL: `${baseURL}/v1`, apiKey: "unused",
});
const cohere = createCohere({ baseURL: `${baseURL}/v2`, apiKey: "unused" });

const openaiCompatible = await embedMany({
  model: compatible.embeddingModel(model), values: texts, maxRetries: 0,
});
const cohereEmbed = await embedMany({
  model: cohere.embeddingModel(model), values: texts, maxRetries: 0,
});
const cohereRerank = await rerank({
  model: cohere.rerankingModel(rerankModel), query, documents, maxRetries: 0,
});

console.log(JSON.stringify({
  openaiCompatible: { embeddings: openaiCompatible.embeddings, usage: openaiCompatible.usage },
  cohereEmbed: { embeddings: cohereEmbed.embeddings },
  cohereRerank: { ranking: cohereRerank.ranking },
}));
