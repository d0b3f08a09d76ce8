-- wrk: POST the JSON bodies of the file named by WRK_BODIES (one a line), in turn.
-- Used by bench/limit.py; wrk is C and leaves a 2-core server its cores.
local bodies = {}
for line in io.lines(os.getenv("WRK_BODIES")) do
  bodies[#bodies + 1] = line
end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

request = function()
  i = i % #bodies + 1
  return wrk.format(nil, wrk.path, nil, bodies[i])
end
