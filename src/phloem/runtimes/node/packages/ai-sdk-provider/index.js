// The AI SDK provider of the branch's AI Gateway: the AI SDK's OpenAI provider pointed at
// `${NEON_AI_GATEWAY_BASE_URL}/openai/v1` with NEON_AI_GATEWAY_TOKEN, both injected by
// phloem into every function of a branch with `preview.aiGateway: true`.
//
//   import { neon } from "@neon/ai-sdk-provider";
//   streamText({ model: neon("gpt-5-mini"), tools: {
//     image_generation: neon.tools.imageGeneration({ outputFormat: "jpeg" }) } });
//
// Models go through the Responses API (the OpenAI provider's default), which the image
// generation tool needs. The variables are read at the first call, not at import, so a
// module that imports this before its env is loaded (dotenv) still works.
import { createOpenAI, openai } from "@ai-sdk/openai";

function settings(options = {}) {
  const base = options.baseURL ?? process.env.NEON_AI_GATEWAY_BASE_URL;
  const apiKey = options.apiKey ?? process.env.NEON_AI_GATEWAY_TOKEN;
  if (!base || !apiKey) {
    throw new Error(
      "@neon/ai-sdk-provider: NEON_AI_GATEWAY_BASE_URL and NEON_AI_GATEWAY_TOKEN are not " +
        "set; enable the AI Gateway in neon.ts (preview: { aiGateway: true }) and deploy, " +
        "or run 'phloem env pull' for local runs",
    );
  }
  const trimmed = base.replace(/\/+$/, "");
  return {
    ...options,
    name: options.name ?? "neon",
    apiKey,
    baseURL: options.baseURL ?? `${trimmed}/openai/v1`,
  };
}

/** A provider with explicit settings (`baseURL` is the full `.../openai/v1` URL). */
export function createNeon(options = {}) {
  let provider;
  const get = () => (provider ??= createOpenAI(settings(options)));
  const neon = (modelId) => get()(modelId);
  neon.languageModel = (modelId) => get().languageModel(modelId);
  neon.chat = (modelId) => get().chat(modelId);
  neon.responses = (modelId) => get().responses(modelId);
  neon.embedding = (modelId) => get().embedding(modelId);
  neon.textEmbeddingModel = (modelId) => get().textEmbeddingModel(modelId);
  neon.image = (modelId) => get().image(modelId);
  // The OpenAI provider's own tools (provider-executed: they need no credentials here).
  neon.tools = openai.tools;
  return neon;
}

/** The branch's gateway, from the injected variables. */
export const neon = createNeon();
export default neon;
