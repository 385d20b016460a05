// Vite: `npm run build` writes the static release that the web hosts' nginx serves from
// /dist/current (build.sh passes --outDir <out>/web/releases/<id>). `npm run dev` proxies
// the services to a portal running locally (PORTAL_DEV_URL, default http://127.0.0.1:8000:
// an HAProxy or any reverse proxy in front of the api, auth and ws services).
import { defineConfig } from 'vite'

const target = process.env.PORTAL_DEV_URL || 'http://127.0.0.1:8000'

export default defineConfig({
  base: '/',
  build: { assetsDir: 'assets', sourcemap: false },
  server: {
    proxy: {
      '/api': target,
      '/auth': target,
      '/ws': { target, ws: true },
    },
  },
})
