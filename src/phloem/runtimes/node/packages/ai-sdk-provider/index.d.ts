import type { OpenAIProvider, OpenAIProviderSettings } from "@ai-sdk/openai";

/** The AI SDK provider of the branch's AI Gateway (an OpenAI provider). */
export type NeonProvider = OpenAIProvider;
export declare function createNeon(options?: OpenAIProviderSettings): NeonProvider;
/** `neon(modelId)`, `neon.tools.imageGeneration(...)`: the branch's gateway. */
export declare const neon: NeonProvider;
export default neon;
