"""lm-eval 0.4 on the bundled reference model, CPU, the three local tasks -> recipes/reference/run/lm_eval.json.
Run from anywhere: python recipes/reference/run_lmeval.py"""
import json, time, torch
from pathlib import Path
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
HERE = Path(__file__).resolve().parent
p=HERE / 'model'
tok=AutoTokenizer.from_pretrained(p)
m=AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
m.set_experts_implementation('eager')
lm=HFLM(pretrained=m, tokenizer=tok, batch_size=16, max_length=512)
t=time.time()
r=lm_eval.simple_evaluate(model=lm, tasks=['brownout_ppl','brownout_cont','brownout_cloze'], task_manager=TaskManager(include_path=str(HERE / 'tasks')), limit=None, log_samples=False)
res={k:{kk:vv for kk,vv in v.items() if isinstance(vv,(int,float))} for k,v in r['results'].items()}
res['seconds']=time.time()-t
print(json.dumps(res, indent=1))
json.dump(res, open(HERE / 'run' / 'lm_eval.json','w'), indent=1)
