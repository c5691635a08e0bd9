// with-ai-sdk's imports: the AI SDK with phloem's @neon/ai-sdk-provider, which reaches
// the branch's AI Gateway at ${NEON_AI_GATEWAY_BASE_URL}/openai/v1 (the Responses API).
import { neon } from "@neon/ai-sdk-provider";
import { generateText } from "ai";

export default {
  async fetch(): Promise<Response> {
    const tool = neon.tools.imageGeneration({ outputFormat: "jpeg", quality: "low" });
    const { text, usage } = await generateText({ model: neon("gpt-test"), prompt: "hi" });
    return Response.json({ text, usage, tool: (tool as { id?: string }).id ?? null });
  },
};
