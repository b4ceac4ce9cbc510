// Load every UI workflow into ComfyUI's own editor (headless Chromium) and compare the prompt the editor
// would queue with the API twin in workflows/api/. Also screenshots each graph into $SHOTS if set.
//
//   NODE_PATH=<dir with playwright-core> node workflows/check_in_editor.mjs http://127.0.0.1:8188
import { readFileSync, readdirSync } from 'node:fs'
import { createRequire } from 'node:module'
import path from 'node:path'

const require = createRequire(import.meta.url)
const { chromium } = require('playwright-core')
const here = path.dirname(new URL(import.meta.url).pathname)
const server = process.argv[2] ?? 'http://127.0.0.1:8188'
const uiDir = path.join(here, '..', 'example_workflows')
const apiDir = path.join(here, 'api')

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu'] })
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } })
const problems = []
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`))
await page.goto(server)
await page.waitForFunction(() => window.app?.graph && window.LiteGraph, null, { timeout: 60000 })
let failed = 0
for (const file of readdirSync(uiDir).filter((f) => f.endsWith('.json')).sort()) {
  const ui = JSON.parse(readFileSync(path.join(uiDir, file), 'utf8'))
  const api = JSON.parse(readFileSync(path.join(apiDir, file), 'utf8'))
  const output = await page.evaluate(async (graph) => {
    await window.app.loadGraphData(graph, true, true, 'check')
    return (await window.app.graphToPrompt()).output
  }, ui)
  const strip = (g) => JSON.stringify(Object.fromEntries(Object.entries(g).sort().map(([id, n]) =>
    [id, { class_type: n.class_type, inputs: Object.fromEntries(Object.entries(n.inputs).sort()) }])))
  const same = strip(output) === strip(api)
  if (!same) {
    failed++
    console.log(`DIFF ${file}\n  editor: ${strip(output)}\n  api:    ${strip(api)}`)
  } else console.log(`ok   ${file}`)
  if (process.env.SHOTS) await page.screenshot({ path: path.join(process.env.SHOTS, file.replace('.json', '.png')) })
}
for (const p of problems) console.log(p)
await browser.close()
process.exit(failed ? 1 : 0)
