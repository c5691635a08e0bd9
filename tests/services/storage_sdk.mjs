// The AWS SDK for JavaScript v3 against a branch's S3 endpoint, as functions use it:
// put (a buffer: header checksum; a stream: aws-chunked with a CRC32 trailer), get with a
// range, list, copy, multipart, presigned GET and PUT. Connects to 127.0.0.1 whatever
// the host name (no resolver knows *.localhost). Prints one JSON object of results.
//   S3_ENDPOINT=http://<branch>--storage.fn.localhost:8787 AWS_ACCESS_KEY_ID=...
//   AWS_SECRET_ACCESS_KEY=... node storage_sdk.mjs
import http from "node:http";
import { Readable } from "node:stream";
import {
  S3Client, PutObjectCommand, GetObjectCommand, ListObjectsV2Command, CopyObjectCommand,
  CreateMultipartUploadCommand, UploadPartCommand, CompleteMultipartUploadCommand,
  HeadObjectCommand,
} from "@aws-sdk/client-s3";
import { getSignedUrl } from "@aws-sdk/s3-request-presigner";
import { NodeHttpHandler } from "@smithy/node-http-handler";

const lookup = (host, opts, cb) =>
  opts && opts.all ? cb(null, [{ address: "127.0.0.1", family: 4 }]) : cb(null, "127.0.0.1", 4);
const agent = new http.Agent({ keepAlive: true, lookup });
const s3 = new S3Client({
  endpoint: process.env.S3_ENDPOINT, region: "us-east-1", forcePathStyle: true,
  credentials: { accessKeyId: process.env.AWS_ACCESS_KEY_ID,
                 secretAccessKey: process.env.AWS_SECRET_ACCESS_KEY },
  requestHandler: new NodeHttpHandler({ httpAgent: agent }),
});

function raw(method, url, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, agent, lookup }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }));
    });
    req.on("error", reject);
    req.end(body);
  });
}

const out = {};
const Bucket = "images";
await s3.send(new PutObjectCommand({ Bucket, Key: "js/buffer.txt", Body: Buffer.from("from node"),
                                     ContentType: "text/plain", Metadata: { lang: "js" } }));
const streamed = Buffer.alloc(200000, "s");
await s3.send(new PutObjectCommand({ Bucket, Key: "js/stream.bin", Body: Readable.from([streamed]),
                                     ContentLength: streamed.length }));
const got = await s3.send(new GetObjectCommand({ Bucket, Key: "js/buffer.txt", Range: "bytes=5-" }));
out.range = await got.Body.transformToString();
out.metadata = got.Metadata;
const head = await s3.send(new HeadObjectCommand({ Bucket, Key: "js/stream.bin" }));
out.streamedLength = head.ContentLength;
await s3.send(new CopyObjectCommand({ Bucket, Key: "js/copy.txt", CopySource: `${Bucket}/js/buffer.txt` }));
const listed = await s3.send(new ListObjectsV2Command({ Bucket, Prefix: "js/" }));
out.keys = (listed.Contents || []).map((c) => c.Key);
const up = await s3.send(new CreateMultipartUploadCommand({ Bucket, Key: "js/multi.bin" }));
const parts = [];
for (const [n, size] of [[1, 5 * 1024 * 1024], [2, 1000]]) {
  const part = await s3.send(new UploadPartCommand({ Bucket, Key: "js/multi.bin",
    UploadId: up.UploadId, PartNumber: n, Body: Buffer.alloc(size, String(n)) }));
  parts.push({ PartNumber: n, ETag: part.ETag });
}
const done = await s3.send(new CompleteMultipartUploadCommand({ Bucket, Key: "js/multi.bin",
  UploadId: up.UploadId, MultipartUpload: { Parts: parts } }));
out.multipartETag = done.ETag;
const putUrl = await getSignedUrl(s3, new PutObjectCommand({ Bucket, Key: "js/presigned.txt" }),
                                  { expiresIn: 60 });
out.presignedPut = (await raw("PUT", putUrl, "presigned from node")).status;
const getUrl = await getSignedUrl(s3, new GetObjectCommand({ Bucket, Key: "js/presigned.txt" }),
                                  { expiresIn: 60 });
out.presignedGet = (await raw("GET", getUrl)).body;
out.tampered = (await raw("GET", getUrl.replace("presigned.txt", "buffer.txt"))).status;
console.log(JSON.stringify(out));
agent.destroy();
